"""`python -m mlx_diffusiongemma.generate`: the command, in cli.py beside the
package's other command pieces. runpy imports the generate package first,
which imports neither this module nor the CLI: no import circle."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main())
