"""Hostile input (issue 20): random bytes, random JSON shapes and random option
values fed to the loader, the option checks and the prompt path.

The one property everywhere: a call gives a result, or raises one of the
package's own errors (ValueError, FileNotFoundError, NotADirectoryError,
FileExistsError; TypeError only for unknown keyword options) whose message is
one line, a sentence rather than a bare value, and, for a file problem, names
the checkpoint. Never another exception (KeyError, AttributeError, a library's
OverflowError or UnicodeDecodeError, ...). On top of it:

* a checkpoint the loader accepts generates from a short prompt (result or our
  error): a config the model cannot run is refused when it loads;
* a safetensors index that points outside the checkpoint directory is refused;
* float options are float32 values: finite after conversion, positive ones
  still positive, t_max > t_min still (the sampler computes in float32);
* a usage error of the command is exit code 2 with one line on stderr;
* the demo tokenizer knows only digits and '=': a prompt or system prompt
  holding any other character (special token strings aside) is a ValueError,
  never a silent <pad>.

Hypothesis runs derandomized (the same examples on every run, no database);
sizes stay moderate in the strategies, and the absurd ones (10**12 layers...)
run in a child process under a memory and time limit.
"""

import contextlib
import copy
import io
import json
import math
import os
import re
import resource
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_diffusiongemma.generate.command import parse_args
from mlx_diffusiongemma.generate import DiffusionOptions, DiffusionResponse, diffusion_generate
from mlx_diffusiongemma.load import load

# The property (`outcome`), the loader check and the child process's cases: helpers/hostile.py
from helpers.hostile import CHILD_CASES, check_loader, checkpoint_copy, link, outcome, time_limit, vm_size, write

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------
# Fixtures: a memory guard, the checkpoints, the models


@pytest.fixture(scope="module", autouse=True)
def memory_guard():
    """An allocation past a few GiB fails in this process (a bug to report)
    rather than taking the machine's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm_size() + 6 * 2**30
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module")
def base(chat_checkpoint) -> Path:
    """The tiny chat checkpoint (conftest): config, weights, tokenizer, generation config."""
    return chat_checkpoint


@pytest.fixture(scope="module")
def chat(chat_checkpoint):
    return load(chat_checkpoint)


@pytest.fixture(scope="module")
def demo():
    return load("demo")


@pytest.fixture(scope="module")
def base_config(base) -> dict:
    return json.loads((base / "config.json").read_text())


COMMON = dict(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# ---------------------------------------------------------------------------
# JSON strategies

NAN, INF = float("nan"), float("inf")
HUGE_INTS = [2**31, 2**63, 2**64, 10**12, 10**30, -(10**12), -(2**31)]
ODD_FLOATS = [0.0, -0.0, 0.5, 1.5, 1e-300, 1e-50, 3.5e38, 1e39, 1e308, -1e39, NAN, INF, -INF]
WORDS = [
    "", "diffusion_gemma", "gemma4", "full_attention", "sliding_attention", "all", "gelu_pytorch_tanh",
    "proportional", "default", "yarn", "llama3", "linear", "mrope", "longrope", "dynamic",
    "model.safetensors", "../x.safetensors", "<pad>", "affine", "mxfp4", "12", "1e39", "nan",
]
json_ints = st.one_of(st.integers(-3, 40), st.sampled_from([0, 128, 511, 512, 513, 1024] + HUGE_INTS))
json_floats = st.one_of(st.sampled_from(ODD_FLOATS), st.floats())
json_text = st.one_of(st.sampled_from(WORDS), st.text(max_size=10))
json_leaves = st.one_of(st.none(), st.booleans(), json_ints, json_floats, json_text)
json_values = st.recursive(
    json_leaves,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(json_text, children, max_size=4)),
    max_leaves=10,
)
# num_hidden_layers stays small in-process: 10**12 layers without layer_types is
# a list of 10**12 layer names (see test_absurd_sizes, in a child process)
small_ints = st.integers(-3, 64)


def json_paths(value, prefix=()):
    """Every path (tuple of keys / indices) into a JSON value."""
    paths = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            paths += json_paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            paths += json_paths(v, prefix + (i,))
    return paths


def edit_value(path):
    if path and path[-1] == "num_hidden_layers":
        return st.one_of(small_ints, json_floats, json_text, st.none())
    return st.one_of(json_values, st.sampled_from(HUGE_INTS + ODD_FLOATS), st.integers(-3, 3))


def edits(document: dict, extra_paths: list):
    """Lists of 1-3 edits to `document`: (path, "set", value) or (path, "del", None)."""
    paths = json_paths(document) + extra_paths
    one = st.sampled_from(paths).flatmap(
        lambda p: st.one_of(
            st.tuples(st.just(p), st.just("set"), edit_value(p)),
            st.tuples(st.just(p), st.just("del"), st.none()),
        )
    )
    return st.lists(one, min_size=1, max_size=3)


def apply_edits(document: dict, changes: list) -> dict:
    document = copy.deepcopy(document)
    for path, op, value in changes:
        node = document
        for key in path[:-1]:
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and isinstance(key, int) and key < len(node):
                node = node[key]
            else:
                node = None
                break
        if node is None or not isinstance(node, (dict, list)):
            continue
        key = path[-1]
        if isinstance(node, list) and not (isinstance(key, int) and key < len(node)):
            continue
        if op == "del":
            if isinstance(node, dict):
                node.pop(key, None)
            else:
                del node[key]
        else:
            node[key] = value
    return document


# ---------------------------------------------------------------------------
# 1. The loader

LOADER_FILES = ["config.json", "generation_config.json", "model.safetensors.index.json"]
TOKENIZER_FILES = ["tokenizer_config.json", "tokenizer.json"]


@settings(max_examples=80, **COMMON)
@given(
    file=st.sampled_from(LOADER_FILES),
    data=st.one_of(
        st.binary(max_size=64),
        st.sampled_from([b"", b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b"{", b"null", b"[]", b"1e999", b"\x00"]),
        st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),
    ),
)
def test_loader_files_of_random_bytes(base, base_config, file, data):
    with checkpoint_copy(base) as path:
        (path / file).write_bytes(data)
        check_loader(path, base_config)


@settings(max_examples=80, **COMMON)
@given(file=st.sampled_from(LOADER_FILES), value=json_values)
def test_loader_files_of_random_json(base, base_config, file, value):
    with checkpoint_copy(base) as path:
        write(path / file, value)
        check_loader(path, base_config)


@settings(max_examples=25, **COMMON)
@given(file=st.sampled_from(TOKENIZER_FILES), data=st.one_of(st.binary(max_size=32), json_values.map(lambda v: json.dumps(v).encode())))
def test_tokenizer_files_of_random_content(base, base_config, file, data):
    with checkpoint_copy(base) as path:
        (path / file).write_bytes(data)
        check_loader(path, base_config)


@pytest.mark.parametrize("file", LOADER_FILES)
def test_loader_deeply_nested_json(base, base_config, file):
    with checkpoint_copy(base) as path:
        (path / file).write_bytes(b"[" * 100_000 + b"]" * 100_000)
        check_loader(path, base_config)


# quantization settings reach mlx's quantize, which can crash the process:
# they run in the child process (test_loader_in_child)
CONFIG_EXTRA_PATHS = [
    ("text_config", "use_bidirectional_attention"),
    ("text_config", "global_head_dim"),
    ("text_config", "num_global_key_value_heads"),
    ("text_config", "rope_parameters", "full_attention", "factor"),
    ("text_config", "rope_parameters", "full_attention", "type"),
]


def _config_edits():
    # the paths to edit: those of the tiny reference config.json (conftest's
    # chat_checkpoint), written out so the strategy exists at collection;
    # the edits apply to the checkpoint's actual config.json
    config = {
        "canvas_length": 12, "model_type": "diffusion_gemma", "tie_word_embeddings": True,
        "text_config": {
            "attention_bias": False, "bos_token_id": 2, "eos_token_id": 1, "head_dim": 16,
            "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 64, "intermediate_size": 128,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            "max_position_embeddings": 512, "moe_intermediate_size": 64, "num_attention_heads": 4,
            "num_experts": 8, "num_hidden_layers": 4, "num_key_value_heads": 2, "pad_token_id": 0,
            "per_layer_config": {"1": {"head_dim": 32, "num_key_value_heads": 1}, "3": {"head_dim": 32, "num_key_value_heads": 1}},
            "rms_norm_eps": 1e-06, "final_logit_softcapping": 30.0,
            "rope_parameters": {
                "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
                "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
            },
            "sliding_window": 8, "top_k_experts": 2, "use_bidirectional_attention": None, "vocab_size": 320,
        },
    }
    return edits(config, CONFIG_EXTRA_PATHS)


@settings(max_examples=150, **COMMON)
@given(changes=_config_edits())
def test_loader_config_edits(base, base_config, changes):
    with checkpoint_copy(base) as path:
        write(path / "config.json", apply_edits(base_config, changes))
        check_loader(path, base_config)


BASE_GENERATION = {
    "eos_token_id": [1, 4], "pad_token_id": 0, "max_new_tokens": 24, "max_denoising_steps": 4,
    "t_min": 0.4, "t_max": 0.8, "entropy_bound": 0.1, "sampler_config": {"entropy_bound": 0.1},
    "stability_threshold": 1, "confidence_threshold": 0.005, "acceptance": "entropy_bound",
    "min_confidence": 0.9, "self_conditioning": "exact", "self_conditioning_k": 64, "fused_sampling": True,
}


@settings(max_examples=80, **COMMON)
@given(changes=edits(BASE_GENERATION, [("sampler_config",), ("max_tokens",), ("unknown_key",)]))
def test_loader_generation_config_edits(base, base_config, changes):
    with checkpoint_copy(base) as path:
        write(path / "generation_config.json", apply_edits(BASE_GENERATION, changes))
        check_loader(path, base_config)


@pytest.fixture(scope="module")
def weight_names(base) -> list:
    return sorted(mx.load(str(base / "model.safetensors")))


SHARD_NAMES = [
    "model.safetensors", "model.safetensors", "model.safetensors", "../x.safetensors", "ABS", "w.npz", "", ".", "..", "./model.safetensors", "sub/model.safetensors",
    "MODEL.SAFETENSORS", "config.json", "x\x00y", "missing.safetensors", "~/x.safetensors", "model.safetensors/",
    "../ckpt/model.safetensors",
]


def _outside(path: Path, shard) -> bool:
    """Whether a weight_map entry names a file outside the checkpoint directory."""
    if not isinstance(shard, str) or "\x00" in shard:
        return False
    inside = os.path.realpath(path)
    target = os.path.realpath(path / shard)
    return not target.startswith(inside + os.sep)


@settings(max_examples=60, **COMMON)
@given(
    data=st.data(),
    shape=st.sampled_from(["entries", "weight_map", "extra"]),
    npz=st.sampled_from(["valid", "garbage", "none"]),
)
def test_loader_index_edits(base, base_config, weight_names, data, shape, npz):
    with checkpoint_copy(base) as path:
        outside = path.parent / "outside"
        link(base / "model.safetensors", path.parent / "x.safetensors")  # what "../x.safetensors" reaches
        link(base / "model.safetensors", outside / "x.safetensors")  # what "ABS" becomes
        link(base / "model.safetensors", path / "sub" / "model.safetensors")
        if npz == "valid":
            np.savez(path / "w.npz", **{k: np.array(v) for k, v in mx.load(str(base / "model.safetensors")).items()})
        elif npz == "garbage":
            (path / "w.npz").write_bytes(b"PK\x03\x04 not a zip")
        weight_map = {name: "model.safetensors" for name in weight_names}
        if shape == "weight_map":
            weight_map = data.draw(json_values, label="weight_map")
        else:
            shard = st.one_of(st.sampled_from(SHARD_NAMES), json_values)
            changes = data.draw(st.dictionaries(st.sampled_from(weight_names), shard, min_size=1, max_size=4), label="entries")
            weight_map.update(changes)
            if shape == "extra":
                weight_map.update(data.draw(st.dictionaries(json_text, shard, max_size=2), label="extra"))
        if isinstance(weight_map, dict):
            weight_map = {k: str(outside / "x.safetensors") if v == "ABS" else v for k, v in weight_map.items()}
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        write(path / "model.safetensors.index.json", index)
        check_loader(path, base_config)
        if isinstance(weight_map, dict) and any(_outside(path, v) for v in weight_map.values()):
            escaped = sorted({v for v in weight_map.values() if _outside(path, v)})
            loaded, _ = outcome(lambda: load(path), (str(path),))
            assert not loaded, f"the index points outside {path} ({escaped}) and the checkpoint loaded"


@settings(max_examples=40, **COMMON)
@given(
    how=st.sampled_from(["truncate", "overwrite"]),
    offset=st.one_of(st.integers(0, 400), st.integers(0, 4_000_000)),
    fraction=st.floats(0, 1),
    patch=st.binary(min_size=1, max_size=8),
)
def test_loader_corrupt_safetensors(base, base_config, how, offset, fraction, patch):
    with checkpoint_copy(base) as path:
        f = path / "model.safetensors"
        data = f.read_bytes()
        f.unlink()  # a hard link: write a new file
        if how == "truncate":
            data = data[: int(len(data) * fraction)]
        else:
            offset = min(offset, len(data) - len(patch))
            data = data[:offset] + patch + data[offset + len(patch):]
        f.write_bytes(data)
        check_loader(path, base_config)


def test_loader_paths(tmp_path, base):
    """Paths that are no checkpoint directory."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "config-dir" / "config.json").mkdir(parents=True)
    cases = [tmp_path / "file", tmp_path / "missing", tmp_path / "empty", tmp_path / "config-dir",
             str(tmp_path / "nul\x00byte"), str(tmp_path / "missing") + "/"]
    failures = []
    for case in cases:
        name = str(case).replace("\x00", "")
        try:
            outcome(lambda: load(case), (str(case), name, str(Path(name)), repr(str(case))[1:-1]))
        except AssertionError as e:
            failures.append(f"{case!r}: {e}")
    assert not failures, "\n".join(failures)


# In a child process, each case under a memory limit and an alarm: sizes no
# machine runs (10**12 layers...) and quantization settings (mlx's quantize
# takes them to C++, where a group size of 0 is a division by zero). A case
# that kills the child is reported as a crash and the child restarts after it.


@pytest.fixture(scope="module")
def child_results(base, tmp_path_factory) -> dict:
    """Every CHILD_CASES result, restarting the child after a case that kills it."""
    work = tmp_path_factory.mktemp("child")
    out, names_file = work / "results.jsonl", work / "names.json"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; from helpers.hostile import run_child_cases; "
        "run_child_cases(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))"
    )
    results, remaining = {}, list(CHILD_CASES)
    while remaining:
        names_file.write_text(json.dumps(remaining))
        try:
            proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code, str(HERE), str(base), str(names_file), str(out)],
                                  capture_output=True, text=True, timeout=120)
            how, stderr = f"exit code {proc.returncode}", proc.stderr
        except subprocess.TimeoutExpired as e:
            how, stderr = f"killed after {e.timeout} s", (e.stderr or b"").decode(errors="replace")
        started = None
        for line in out.read_text().splitlines() if out.exists() else []:
            r = json.loads(line)
            if r.get("start"):
                started = r["case"]
            else:
                results[r["case"]], started = r, None
        if started is not None:  # the case the child died in
            tail = "\n".join(line for line in stderr.splitlines() if "Warning" not in line)[-2500:]
            results[started] = {"case": started, "ok": False, "error": f"the child process died in this case ({how})",
                                "traceback": tail}
        elif len(results) < len(CHILD_CASES):  # died outside any case: report the rest
            for name in remaining:
                results.setdefault(name, {"case": name, "ok": False, "error": f"the child died ({how})", "traceback": stderr[-2500:]})
        remaining = [name for name in CHILD_CASES if name not in results]
    return results


def _case_id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=*:,{}\[\]\"-]+", " ", name)[:90]


@pytest.mark.parametrize("case", list(CHILD_CASES), ids=[_case_id(n) for n in CHILD_CASES])
def test_loader_in_child(child_results, case):
    """Sizes no machine runs and quantization settings: refused with our
    error naming the checkpoint (or, if accepted, one canvas generates) -
    never a crash, an allocation, a hang or a library's exception."""
    r = child_results[case]
    assert r["ok"], f"{r['error']}\n{r['traceback']}"


# ---------------------------------------------------------------------------
# 2. Options

OPTION_NAMES = [f.name for f in fields(DiffusionOptions)]
UNKNOWN_OPTIONS = ["temperature", "top_k", "max_new_tokens", "T_MAX", "sampler_config", "x"]
FLOAT_OPTIONS = ("t_min", "t_max", "entropy_bound", "confidence_threshold", "min_confidence")
POSITIVE_FLOAT_OPTIONS = ("entropy_bound", "confidence_threshold", "min_confidence")

option_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.sampled_from(HUGE_INTS + [10**400]),
    st.sampled_from(ODD_FLOATS + [1e-45, 3.4e38, 3.4028235e38, 0.4, 0.8, 1.0, 5e-324]),
    st.floats(),
    st.sampled_from(["entropy_bound", "confidence", "exact", "top-k", "", "0.5", "1"]),
    st.text(max_size=5),
    st.lists(st.one_of(st.integers(-3, 330), st.sampled_from(HUGE_INTS), st.floats(0, 2)), max_size=3),
    st.integers(-3, 330).map(np.int64),
    st.sampled_from([np.float32(0.5), np.float64(1e39), np.float64(NAN), np.uint64(2**63)]),
)
float_values = st.one_of(st.sampled_from(ODD_FLOATS + [1e-45, 3.4e38, 3.4028235e38, 5e-324, 10**400, 0, 1]), st.floats())
option_dicts = st.one_of(
    st.dictionaries(st.sampled_from(OPTION_NAMES + UNKNOWN_OPTIONS), option_values, max_size=5),
    st.dictionaries(st.sampled_from(FLOAT_OPTIONS), float_values, max_size=3),
)


def _float32(value) -> float:
    try:
        x = float(value)
    except OverflowError:  # an int past float64's range
        return INF if value > 0 else -INF
    with np.errstate(over="ignore", under="ignore"):
        return float(np.float32(x))


def check_float32(values: dict) -> None:
    """Float options the sampler computes with in float32 are float32 values."""
    present = {k: values[k] for k in FLOAT_OPTIONS if values.get(k) is not None}
    for name, value in present.items():
        assert math.isfinite(_float32(value)), f"{name}={value!r} is accepted but is {_float32(value)} in float32"
        if name in POSITIVE_FLOAT_OPTIONS:
            assert _float32(value) > 0, f"{name}={value!r} is accepted as > 0 but is 0 in float32"
    if "t_min" in present and "t_max" in present:
        t_min, t_max = _float32(present["t_min"]), _float32(present["t_max"])
        assert t_max > t_min, (
            f"t_min={present['t_min']!r}, t_max={present['t_max']!r} are accepted but in float32 "
            f"t_max={t_max} is not greater than t_min={t_min}"
        )


@settings(max_examples=300, **COMMON)
@given(values=option_dicts)
def test_options_check(values):
    checked, _ = outcome(lambda: DiffusionOptions.check(dict(values)))
    if checked:
        check_float32({k: v for k, v in values.items() if k in OPTION_NAMES})


@settings(max_examples=300, **COMMON)
@given(overrides=option_dicts)
def test_options_resolve(chat, overrides):
    model, tokenizer = chat
    unknown = bool(set(overrides) - set(OPTION_NAMES))
    resolved, options = outcome(lambda: DiffusionOptions.resolve(model, tokenizer, dict(overrides)), unknown_options=unknown)
    if resolved:
        assert not unknown, f"unknown option(s) {sorted(set(overrides) - set(OPTION_NAMES))} accepted"
        check_float32(asdict(options))


# values each option takes, so that generation runs often, the hostile ones beside them
VALID_OPTION_VALUES = {
    "t_min": st.floats(0, 0.5), "t_max": st.floats(0.6, 2), "entropy_bound": st.floats(1e-3, 10),
    "stability_threshold": st.integers(0, 3), "confidence_threshold": st.floats(1e-4, 1),
    "eos_token_id": st.one_of(st.integers(0, 319), st.lists(st.integers(0, 319), max_size=3)),
    "pad_token_id": st.one_of(st.none(), st.integers(0, 319)), "acceptance": st.sampled_from(["entropy_bound", "confidence"]),
    "min_confidence": st.floats(0.01, 1), "self_conditioning": st.sampled_from(["exact", "top-k"]),
    "self_conditioning_k": st.one_of(st.integers(1, 400), st.just(2**31 - 1)), "fused_sampling": st.booleans(),
}


def _generation_overrides():
    names = [n for n in OPTION_NAMES if n not in ("max_tokens", "max_denoising_steps")]
    one = st.one_of(st.sampled_from(names), st.sampled_from(names), st.sampled_from(UNKNOWN_OPTIONS)).flatmap(
        lambda n: st.tuples(st.just(n), st.one_of(VALID_OPTION_VALUES[n], VALID_OPTION_VALUES[n], option_values)
                            if n in VALID_OPTION_VALUES else option_values)
    )
    return st.lists(one, max_size=5).map(dict)


@settings(max_examples=200, **COMMON)
@given(
    overrides=_generation_overrides(),
    max_tokens=st.one_of(st.integers(1, 30), st.integers(-1, 30), st.sampled_from([None, 1.5, "2", True, NAN, 10**30])),
    steps=st.one_of(st.integers(1, 2), st.integers(-1, 2), st.sampled_from([None, 1.0, "1", True, NAN])),
    seed=st.one_of(st.none(), st.integers(0, 3), st.integers(-3, 3),
                   st.sampled_from([2**64 - 1, 2**64, -(2**63), 1.5, NAN, "1", True, np.uint64(7)])),
)
def test_options_generate(chat, overrides, max_tokens, steps, seed):
    model, tokenizer = chat
    unknown = bool(set(overrides) - set(OPTION_NAMES))
    outcome(
        lambda: diffusion_generate(model, tokenizer, "why is the sky blue", seed=seed, max_tokens=max_tokens,
                                   max_denoising_steps=steps, **overrides),
        unknown_options=unknown,
    )


FLAGS = [
    "--model", "--prompt", "-p", "--prompts-file", "--system-prompt", "--ignore-chat-template", "--enable-thinking",
    "--show-thinking", "--max-tokens", "-m", "--seed", "--verbose", "--max-denoising-steps", "--t-min", "--t-max",
    "--entropy-bound", "--stability-threshold", "--confidence-threshold", "--eos-token-id", "--acceptance",
    "--min-confidence", "--self-conditioning", "--self-conditioning-k", "--no-fused-sampling", "--decoder-input-ids",
    "--t", "--max", "--unknown", "-x", "--", "-", "--t-max=1e39", "--seed=-1",
]
ARG_VALUES = [
    "demo", "1", "0", "-1", "1e39", "1e-300", "1e-50", "3.5e38", "nan", "inf", "-inf", "1e400", "0.5", "2**64",
    "18446744073709551616", "18446744073709551615", "99999999999999999999", "True", "false", "confidence", "top-k",
    "exact", "", " ", "a\nb", "a\rb", "\u0661\u0662", "\uff11", "0x10", "1_000", "\udcff",
]
argv_items = st.one_of(st.sampled_from(FLAGS), st.sampled_from(ARG_VALUES), st.text(max_size=6))


@settings(max_examples=300, **COMMON)
@given(prefix=st.booleans(), argv=st.lists(argv_items, max_size=8))
def test_cli_parse_args(prefix, argv):
    argv = (["--model", "demo", "--prompt", "x"] if prefix else []) + argv
    err, out = io.StringIO(), io.StringIO()
    try:
        with time_limit(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            _, args = parse_args(argv)
    except SystemExit as e:
        if e.code == 0 and out.getvalue().startswith("usage:"):  # --help, abbreviated
            return
        message = err.getvalue()
        assert e.code == 2, f"exit code {e.code!r} for {argv!r}: {message!r}"
        assert message.endswith("\n") and message.count("\n") == 1, f"usage error of several lines: {message!r}"
        assert message.startswith("python -m mlx_diffusiongemma.generate: error: "), message
        return
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"parse_args({argv!r}) raised {type(e).__name__}: {e}") from e
    check_float32({k: getattr(args, k) for k in FLOAT_OPTIONS})


# ---------------------------------------------------------------------------
# 3. The prompt path

CHAT_SPECIALS = ["<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>"]
ODD_PIECES = CHAT_SPECIALS + [
    "<unk>", "{{ bos_token }}", "{% raw %}", "\x00", "\ufeff", "\u2028", "\r\n", "\t", " ", "=", "\x85", "\U0001f600",
    "hello", "world", "why", "is", "the", "sky", "blue", "w7", "system", "model", "user",
]
text_pieces = st.one_of(
    st.sampled_from(ODD_PIECES),
    st.text(max_size=8),
    st.binary(max_size=8).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.text(alphabet=st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"]), max_size=4),
    st.text(alphabet="0123456789=", max_size=8),
)
texts = st.one_of(
    st.lists(text_pieces, max_size=6).map("".join),
    # long ones: a context's worth (the chat model's is 512 tokens, the demo's 4096), or
    # past it; "hello" first, so that a failure shrinks to it
    st.sampled_from(["hello", "hello " * 300, "x" * 5000, "a b " * 1500, "1" * 300, "1" * 5000, "<pad>" * 600]),
)
system_prompts = st.one_of(st.none(), texts, st.sampled_from([0, 5, b"hello", ["hello"], {"x": 1}]))

id_leaves = st.one_of(
    st.integers(-3, 330),
    st.sampled_from([-1, 2**31, 2**63, 2**64, 10**30, -(10**30), 1.0, 2.5, NAN, True, False, "1", None]),
)
id_nests = st.recursive(id_leaves, lambda c: st.lists(c, max_size=5), max_leaves=20)
id_arrays = st.one_of(
    st.lists(st.integers(0, 319), min_size=0, max_size=20).map(lambda x: np.array(x, dtype=np.int64)),
    st.lists(st.integers(0, 319), min_size=1, max_size=20).map(lambda x: mx.array(x)),
    st.lists(st.integers(0, 255), min_size=1, max_size=20).map(lambda x: np.array([x], dtype=np.uint8)),
    st.lists(st.integers(0, 319), min_size=2, max_size=20).map(lambda x: mx.array([x, x])),
    st.lists(st.integers(0, 319), min_size=1, max_size=20).map(lambda x: np.array(x, dtype=np.float32)),
)
prompts = st.one_of(texts, id_nests, id_arrays, st.lists(st.one_of(texts, id_nests), min_size=1, max_size=3))
canvases = st.one_of(
    st.none(),
    id_nests,
    st.lists(st.integers(-1, 330), min_size=12, max_size=12),
    st.lists(st.integers(0, 319), min_size=12, max_size=12).map(lambda x: [x]),
    st.lists(st.sampled_from([0, 1, 2.0, 2**40, -1, "1"]), min_size=12, max_size=12),
)


def _is_result(value, prompt) -> bool:
    if isinstance(value, list):
        return isinstance(prompt, (list, tuple)) and all(isinstance(r, DiffusionResponse) for r in value)
    return isinstance(value, DiffusionResponse)


@settings(max_examples=200, **COMMON)
@given(
    prompt=prompts,
    system_prompt=system_prompts,
    enable_thinking=st.booleans(),
    use_chat_template=st.booleans(),
    decoder_input_ids=canvases,
    with_tokenizer=st.booleans(),
)
def test_prompt_path_chat(chat, prompt, system_prompt, enable_thinking, use_chat_template, decoder_input_ids, with_tokenizer):
    model, tokenizer = chat
    ok, result = outcome(
        lambda: diffusion_generate(
            model, tokenizer if with_tokenizer else None, prompt, system_prompt=system_prompt,
            enable_thinking=enable_thinking, use_chat_template=use_chat_template,
            decoder_input_ids=decoder_input_ids, max_tokens=2, max_denoising_steps=1, seed=0,
        )
    )
    if ok:
        assert _is_result(result, prompt), f"diffusion_generate returned {type(result).__name__}"


DEMO_ALPHABET = set("0123456789=")
DEMO_SPECIALS = re.compile("<pad>|<eos>|<bos>")


def _foreign(text) -> list:
    """Characters of `text` the demo tokenizer does not know (its special token strings aside)."""
    return sorted(set(DEMO_SPECIALS.sub("", text)) - DEMO_ALPHABET)


demo_digits = st.text(alphabet="0123456789", min_size=3, max_size=8)
demo_texts = st.one_of(
    texts,
    demo_digits,
    st.lists(st.one_of(st.text(alphabet="0123456789=", min_size=1, max_size=8), st.sampled_from(["<pad>", "<eos>", "<bos>", " ", "a", "\udcff", "\x00", "\u0661"])), max_size=5).map("".join),
)


@settings(max_examples=200, **COMMON)
@given(
    prompt=st.one_of(demo_texts, st.lists(demo_texts, min_size=1, max_size=2)),
    system_prompt=st.one_of(st.none(), demo_texts),
    use_chat_template=st.booleans(),
)
def test_prompt_path_demo(demo, prompt, system_prompt, use_chat_template):
    model, tokenizer = demo
    ok, result = outcome(
        lambda: diffusion_generate(
            model, tokenizer, prompt, system_prompt=system_prompt, use_chat_template=use_chat_template,
            max_tokens=1, max_denoising_steps=1, seed=0,
        )
    )
    if ok:
        assert _is_result(result, prompt), f"diffusion_generate returned {type(result).__name__}"
        for p in prompt if isinstance(prompt, list) else [prompt]:
            # the chat template trims the message; raw encoding keeps it whole
            seen = p.strip() if use_chat_template else p
            assert not _foreign(seen), f"prompt {p!r} holds {_foreign(seen)}, unknown to the demo tokenizer, and generated"
        if system_prompt is not None:
            assert not _foreign(system_prompt), (
                f"system prompt {system_prompt!r} holds {_foreign(system_prompt)}, unknown to the demo tokenizer, and generated"
            )
