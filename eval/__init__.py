"""MTEB retrieval evaluation of every (layers, dims, bits) cell of a model from one encoding pass."""
