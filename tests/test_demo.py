"""The shipped demo model: it sorts held-out digit strings with the default
reference sampler, several tokens per decoder pass, and the first command runs it."""

import os
import subprocess
import sys
from pathlib import Path

from mlx_diffusiongemma import load
from mlx_diffusiongemma.demo import DEMO_DIR, problems, score, write_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_demo_is_small():
    size = sum(f.stat().st_size for f in DEMO_DIR.iterdir())
    assert size <= 10 * 2**20, f"the embedded demo model takes {size / 2**20:.1f} MiB"


def test_shipped_tokenizer_is_what_write_tokenizer_writes(tmp_path):
    write_tokenizer(tmp_path)
    for f in tmp_path.iterdir():
        assert f.read_bytes() == (DEMO_DIR / f.name).read_bytes(), f.name
    _, tokenizer = load("demo")
    assert tokenizer.unk_token_id == 0  # declared, so unknown characters are refused


def test_shipped_demo_solves_held_out_problems():
    model, tokenizer = load("demo")
    exact, mean, pooled = score(model, tokenizer, problems(100, seed=3))
    print(f"\ndemo on 100 held-out problems: exact-match {exact:.0%}, tokens per decoder pass {mean:.2f} "
          f"(mean over responses; {pooled:.2f} pooled)")
    assert exact >= 0.95 and mean > 2


def test_first_command_runs_the_demo():
    result = subprocess.run(
        [sys.executable, "-m", "mlx_diffusiongemma"], capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    prompt_line, answer, stats = result.stdout.splitlines()[-3:]
    digits = prompt_line.rpartition(" ")[2]
    assert answer == "".join(sorted(digits)) and stats.startswith("Prompt: ")
