"""The shipped demo model: it sorts held-out digit strings with the default
reference sampler, several tokens per decoder pass, and the first command runs it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_diffusiongemma import load
from mlx_diffusiongemma.__main__ import main as demo_main
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
    # A random prompt and random draws: the model sorts ~99% of them, so this
    # checks the run and its output's shape; the seeded test below checks the answer.
    result = subprocess.run(
        [sys.executable, "-m", "mlx_diffusiongemma"], capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    prompt_line, answer, stats = result.stdout.splitlines()[-3:]
    assert re.fullmatch(r"demo model .*, prompt: [0-9]{3,8}", prompt_line), prompt_line
    assert re.fullmatch("[0-9]+", answer) and stats.startswith("Prompt: "), result.stdout


def test_first_command_with_a_seed_repeats_its_prompt_and_answer(capsys):
    outputs = []
    for _ in range(2):
        assert demo_main(["--seed", "5", "--verbose", "False"]) == 0
        outputs.append(capsys.readouterr().out.splitlines())
    assert outputs[0] == outputs[1]
    prompt_line, answer = outputs[0]
    assert answer == "".join(sorted(prompt_line.rpartition(" ")[2]))


def test_first_command_names_the_prompt_it_uses(capsys):
    assert demo_main(["--prompt", "4321", "--verbose", "False"]) == 0
    assert capsys.readouterr().out.splitlines() == ["demo model (trained by this package to sort digits), prompt: 4321", "1234"]


def test_first_command_help_has_no_header(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo_main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: ") and "demo model" not in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--prompt", "abc"], "argument --prompt/-p: the demo model sorts 3 to 8 digits, got 'abc'"),
        (["-p", "123456789"], "argument --prompt/-p: the demo model sorts 3 to 8 digits, got '123456789'"),
        (["--prompt", "4321", "--seed", "-1"], "seed must be an integer in [0, 2**64), got -1"),
        (["--min-confidence", "2"], "min_confidence must be in (0, 1], got 2.0"),
    ],
)
def test_first_command_usage_errors_come_before_the_header(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo_main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    assert len(captured.err.splitlines()) == 1 and message in captured.err, captured.err
