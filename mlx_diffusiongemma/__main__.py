"""`python -m mlx_diffusiongemma`: generate text end to end on a toy checkpoint.

Writes a random toy model with a small tokenizer and chat template into a
temporary directory, then runs `python -m mlx_diffusiongemma.generate` on it.
Needs no network; the text is random words, the pipeline is the real one.
"""

import sys
import tempfile
from pathlib import Path

from .generate import main as generate
from .toy import write_toy_checkpoint


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_toy_checkpoint(Path(tmp) / "toy")
        print(f"toy checkpoint (random weights) written to {path}", file=sys.stderr)
        return generate(["--model", str(path), "--prompt", "Why is the sky blue?", "--max-tokens", "32", "--seed", "0",
                         *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
