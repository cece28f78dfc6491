class RecipeError(ValueError):
    pass
