"""`python -m mlx_diffusiongemma`: the embedded demo model sorts a random digit
string by parallel denoising. In a terminal the canvas converges live; then the
answer and a statistics line. Needs no network and no download."""

import random
import sys

from .demo import problem
from .generate import main as generate


def main() -> int:
    digits, _ = problem(random.Random())
    print(f"demo model (trained by this package to sort digits), prompt: {digits}", flush=True)
    return generate(["--model", "demo", "--prompt", digits, *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
