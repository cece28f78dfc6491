"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the key, the bad value and what is valid."""
