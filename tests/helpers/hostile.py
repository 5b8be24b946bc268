"""The shared parts of test_hostile_input.py: the property every call is held
to (`outcome`), the loader check on a checkpoint (`check_loader`), and the
cases of the child process with its entry point `run_child_cases`, which the
test starts as `python -c` with tests/ on sys.path."""

import contextlib
import copy
import inspect
import json
import os
import resource
import shutil
import signal
import tempfile
import time
import traceback
from pathlib import Path

from hypothesis import event

from mlx_diffusiongemma.generate import diffusion_generate
from mlx_diffusiongemma.load import load, load_config, load_generation_config
from mlx_diffusiongemma.model import ModelArgs

# ---------------------------------------------------------------------------
# The property


OWN_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError)
CALL_SECONDS = 20  # a single call past this is a hang (checked with SIGALRM)


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float = None):
    seconds = seconds or CALL_SECONDS

    def alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check_own_error(e: BaseException, names=(), unknown_options: bool = False) -> None:
    """Raise AssertionError (chained to `e`, so hypothesis tells apart the
    places that raised) unless `e` is one of the package's errors with a
    one-line message naming one of `names` (when given)."""
    kinds = OWN_ERRORS + ((TypeError,) if unknown_options else ())
    message = str(e)
    problems = []
    if type(e) not in kinds:
        problems.append(f"{type(e).__name__} is not one of the package's errors")
    elif type(e) is TypeError and not message.startswith("unknown generation option"):
        problems.append("a TypeError that is not about unknown options")
    if not message.strip():
        problems.append("empty message")
    elif "\n" in message:
        problems.append("message spans several lines")
    elif " " not in message.strip():
        problems.append("message is a bare value, not a sentence")
    if names and not any(n in message for n in names):
        problems.append(f"message does not name {names[0]}")
    if problems:
        where = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
        at = f" (raised at {where[0].filename}:{where[0].lineno})" if where else ""
        raise AssertionError(f"{'; '.join(problems)}: {type(e).__name__}: {message[:400]!r}{at}") from e


def outcome(call, names=(), unknown_options=False, what=None):
    """(True, result) or (False, error) after checking the error is ours."""
    what = what or getattr(call, "__qualname__", "call").split(".")[0]
    try:
        with time_limit():
            result = call()
    except Exception as e:  # noqa: BLE001 - the point: anything else is a failure
        _event(f"{what}: {type(e).__name__}")
        check_own_error(e, names, unknown_options)
        return False, e
    _event(f"{what}: result")
    return True, result


def _event(label: str) -> None:
    """How often each call gave a result or an error (--hypothesis-show-statistics):
    a test whose examples all fail one early check tests little."""
    try:
        event(label)
    except Exception:  # noqa: BLE001 - outside a hypothesis test (the child process)
        pass


def vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 4 * 2**30


# ---------------------------------------------------------------------------
# Checkpoints and the loader


@contextlib.contextmanager
def checkpoint_copy(base: Path):
    """A fresh copy of `base` (weights hard-linked) in a fresh temporary directory."""
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        path = Path(tmp) / "ckpt"
        path.mkdir()
        for f in base.iterdir():
            if f.name.endswith(".safetensors"):
                link(f, path / f.name)
            else:
                shutil.copy(f, path / f.name)
        yield path


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy(src, dst)


SMOKE_PROMPT = "why is the sky blue"


def _generation_config(path: Path, config: dict):
    """load_generation_config(path) - or (path, args) where it checks the eos
    ids against the model: the args of `config`, the unedited checkpoint's."""
    if len(inspect.signature(load_generation_config).parameters) == 1:
        return load_generation_config(path)
    return load_generation_config(path, ModelArgs.from_dict(config))


def check_loader(path: Path, config: dict) -> None:
    """The loader's entry points on `path`: a result or our error naming the
    checkpoint; and what loads generates one canvas (result or our error).
    `config`: the unedited checkpoint's config.json."""
    names = (str(path),)
    outcome(lambda: load_config(path), names, what="load_config")
    outcome(lambda: _generation_config(path, config), names, what="load_generation_config")
    loaded, result = outcome(lambda: load(path), names, what="load")
    if loaded:
        model, tokenizer = result
        outcome(lambda: diffusion_generate(model, tokenizer, SMOKE_PROMPT, max_tokens=1, max_denoising_steps=1, seed=0),
                what="generate from text")
        outcome(lambda: diffusion_generate(model, None, [2, 9, 10], max_tokens=1, max_denoising_steps=1, seed=0),
                what="generate from ids")


def write(path: Path, data) -> None:
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())


# ---------------------------------------------------------------------------
# In a child process, each case under a memory limit and an alarm: sizes no
# machine runs (10**12 layers...) and quantization settings (mlx's quantize
# takes them to C++, where a group size of 0 is a division by zero). A case
# that kills the child is reported as a crash and the child restarts after it.


def _absurd_cases() -> dict:
    text = lambda **kw: ("text", kw)  # noqa: E731
    top = lambda **kw: ("top", kw)  # noqa: E731
    cases = {
        "num_hidden_layers=10**12 without layer_types": [text(num_hidden_layers=10**12, layer_types=None)],
        "num_hidden_layers=2**31-1 without layer_types": [text(num_hidden_layers=2**31 - 1, layer_types=None)],
        "num_hidden_layers=10**12": [text(num_hidden_layers=10**12)],
        "canvas_length=2**31-1 max_position_embeddings=10**12": [top(canvas_length=2**31 - 1), text(max_position_embeddings=10**12)],
        "canvas_length=10**12 max_position_embeddings=10**13": [top(canvas_length=10**12), text(max_position_embeddings=10**13)],
        "canvas_length=10**6 max_position_embeddings=10**7": [top(canvas_length=10**6), text(max_position_embeddings=10**7)],
        "sliding_window=10**12": [text(sliding_window=10**12)],
        "max_position_embeddings=10**12": [text(max_position_embeddings=10**12)],
        "per_layer_config head_dim=10**12": [text(per_layer_config={"1": {"head_dim": 10**12}, "3": {"head_dim": 32, "num_key_value_heads": 1}})],
        "per_layer_config index 10**12": [text(per_layer_config={"1000000000000": {"head_dim": 32}})],
        "global_head_dim=10**12": [text(per_layer_config=None, global_head_dim=10**12)],
        "rope partial_rotary_factor=-10**6": [text(rope_parameters={"full_attention": {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": -(10**6)}})],
    }
    for field in ("hidden_size", "vocab_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "num_experts", "top_k_experts", "moe_intermediate_size"):
        cases[f"{field}=10**12"] = [text(**{field: 10**12})]
        cases[f"{field}=2**31-1"] = [text(**{field: 2**31 - 1})]
        cases[f"{field}=2**24"] = [text(**{field: 2**24})]
    return {f"size: {name}": ("edit", changes) for name, changes in cases.items()}


QUANTIZED_MODULES = ["model.decoder.embed_tokens", "model.decoder.layers.0.mlp.up_proj",
                     "model.decoder.layers.1.experts.switch_glu.gate_proj", "model.decoder.self_conditioning.up_proj"]


def _quantization_cases(random_cases: int = 25) -> dict:
    """Explicit quantization settings, then `random_cases` drawn with a fixed seed."""
    explicit = [
        {"bits": 4, "group_size": 0}, {"bits": 0, "group_size": 64}, {"bits": 4, "group_size": -1},
        {"bits": 100, "group_size": 64}, {"bits": 4, "group_size": 64, "mode": "x"}, {"bits": 4, "group_size": 3},
        {"bits": "4", "group_size": "64"}, {"bits": 4.5, "group_size": 64}, {"bits": None, "group_size": None},
        {"bits": 4, "group_size": 64, "mode": "mxfp4"}, {"bits": 4, "group_size": 10**12},
    ]
    entries = [True, False, {}, "x", [], 1, None, {"bits": 4, "group_size": 0}, {"bits": 0, "group_size": 64},
               {"bits": -3, "group_size": 64}, {"bits": 4, "group_size": 3}, {"bits": 4.5, "group_size": 64},
               {"bits": 4, "group_size": 10**12}, {"bits": 4, "group_size": 64, "mode": "nvfp4"}, {"bits": 8, "group_size": 32}]
    for entry in entries:
        explicit.append({"bits": 4, "group_size": 64, "model.decoder.embed_tokens": entry})
    explicit += [[1, 2], "q4", 4, {"bits": 4}, {"group_size": 64}]
    rng = __import__("random").Random(20)
    leaves = [0, 1, 2, 3, 4, 8, 16, 32, 64, 128, -1, 10**12, 4.5, "4", None, True, "affine", "mxfp4", "nvfp4", "mxfp8", "x"]
    for _ in range(random_cases):
        q = {"bits": rng.choice(leaves), "group_size": rng.choice(leaves)}
        if rng.random() < 0.3:
            q["mode"] = rng.choice(leaves)
        for module in rng.sample(QUANTIZED_MODULES, rng.randint(0, 2)):
            q[module] = rng.choice(entries + [{"bits": rng.choice(leaves), "group_size": rng.choice(leaves)}])
        explicit.append(q)
    cases = {}
    for q in explicit:
        key = "quantization_config" if len(cases) % 5 == 4 else "quantization"
        cases[f"{key}: {json.dumps(q)}"] = ("set", {key: q})
    return cases


CHILD_CASES = {**_absurd_cases(), **_quantization_cases()}


def _child_config(config: dict, case) -> dict:
    kind, spec = case
    config = copy.deepcopy(config)
    if kind == "set":
        config.update(copy.deepcopy(spec))
        return config
    for where, values in spec:
        target = config if where == "top" else config["text_config"]
        for k, v in values.items():
            if v is None:
                target.pop(k, None)
            else:
                target[k] = v
    return config


def run_child_cases(base: Path, names_file: Path, out: Path) -> None:
    """In the child: each named case under the alarm, a "start" line before it
    and its result after (a start without a result: the case killed the child)."""
    global CALL_SECONDS
    CALL_SECONDS = 10  # a hang here is 10**12 layers: no need to wait longer
    config = json.loads((base / "config.json").read_text())
    limit = vm_size() + 3 * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    with out.open("a") as f:
        for name in json.loads(names_file.read_text()):
            f.write(json.dumps({"case": name, "start": True}) + "\n")
            f.flush()
            result, start = {"case": name, "ok": True}, time.perf_counter()
            try:
                with checkpoint_copy(base) as path:
                    write(path / "config.json", _child_config(config, CHILD_CASES[name]))
                    check_loader(path, config)
            except AssertionError as e:
                result = {"case": name, "ok": False, "error": str(e),
                          "traceback": "".join(traceback.format_exception(e.__cause__ or e))[-2500:]}
            result["seconds"] = round(time.perf_counter() - start, 3)
            f.write(json.dumps(result) + "\n")
            f.flush()
