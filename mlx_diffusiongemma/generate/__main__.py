"""`python -m mlx_diffusiongemma.generate`: the command (command.py). runpy
imports the generate package first, which imports neither this module nor
the command."""

import sys

from .command import main

if __name__ == "__main__":
    sys.exit(main())
