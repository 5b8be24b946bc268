"""`python -m mlx_diffusiongemma`: the embedded demo model sorts a digit string
(`--prompt`, else a random one, drawn from `--seed` when given so the whole
run repeats) by parallel denoising. In a terminal the canvas
converges live; then the answer and a statistics line. Needs no network and no
download. Every other flag is generate's."""

import random
import re
import sys

from .arguments import ArgumentParser, checked
from .generate.command import main as generate
from .generate.command import parse_args
from .demo import MAX_DIGITS, MIN_DIGITS, problem


def demo_prompt(text: str) -> str:
    if not re.fullmatch(f"[0-9]{{{MIN_DIGITS},{MAX_DIGITS}}}", text):
        raise ValueError(f"the demo model sorts {MIN_DIGITS} to {MAX_DIGITS} digits, got {text!r}")
    return text


def main(argv=None) -> int:
    # A prompt the demo was not trained on is a usage error (exit 2), refused at
    # parsing like any bad flag value: the model would answer it with nonsense.
    parser = ArgumentParser(prog="python -m mlx_diffusiongemma", add_help=False)
    parser.add_argument("--prompt", "-p", type=checked(str, demo_prompt), default=None)
    args, rest = parser.parse_known_args(argv)
    forwarded = ["--model", "demo", "--prompt", args.prompt or "0", *rest]
    seed = parse_args(forwarded)[1].seed  # --help and usage errors come before the header
    prompt = args.prompt or problem(random.Random(seed))[0]
    forwarded[3] = prompt
    print(f"demo model (trained by this package to sort digits), prompt: {prompt}", flush=True)
    return generate(forwarded)


if __name__ == "__main__":
    sys.exit(main())
