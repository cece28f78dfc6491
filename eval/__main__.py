"""``python -m eval grid ...``: the same entry point as the ``elastic-eval`` console script."""

from eval.cli import main

main()
