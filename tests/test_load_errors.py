"""Loader failure modes: each test damages a copy of one tiny reference checkpoint
and checks that `load_model` raises the right exception with a message that names
the problem. Also: sharded and hub-cache (offline) checkpoints, and bfloat16 on the CPU."""

import json
import shutil
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlx_diffusiongemma.load import load_model
from reference import build_reference, save_reference

PROMPT = [2, 17, 45, 301, 8, 99, 120]
CANVAS = [5, 260, 7, 7, 33, 310, 1, 0, 64, 128, 250, 3]
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = save_reference(build_reference(seed=0), tmp_path_factory.mktemp("tiny"))
    assert sorted(p.name for p in path.glob("*.safetensors")) == [WEIGHTS]
    return path


@pytest.fixture(scope="module")
def reference_logits(checkpoint) -> np.ndarray:
    return logits(load_model(checkpoint))


@pytest.fixture
def ckpt(checkpoint, tmp_path) -> Path:
    """A fresh copy of the checkpoint, free to damage."""
    return Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))


def logits(model) -> np.ndarray:
    cache = model.make_cache()
    model.encode(PROMPT, cache)
    out = model.decode(CANVAS, cache)
    mx.eval(out)
    return np.array(out)


def rewrite_weights(path: Path, edit) -> None:
    """Apply `edit` (dict -> None, in place) to the checkpoint's tensors and write them back."""
    weights = load_file(path / WEIGHTS)
    edit(weights)
    save_file(weights, path / WEIGHTS, metadata={"format": "pt"})


def edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(ckpt)


def test_wrong_model_type(ckpt):
    edit_config(ckpt, lambda c: c.update(model_type="gemma4"))
    with pytest.raises(ValueError, match=r"'gemma4'.*'diffusion_gemma'"):
        load_model(ckpt)


def test_config_missing_field(ckpt):
    edit_config(ckpt, lambda c: c["text_config"].pop("hidden_size"))
    with pytest.raises(ValueError, match=r"config\.json.*hidden_size"):
        load_model(ckpt)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c.pop("canvas_length"), "config has no canvas_length"),
        (lambda c: c.update(canvas_length=0), "canvas_length must be an integer >= 1, got 0"),
        (lambda c: c["text_config"].update(hidden_size="64"), "hidden_size must be an integer >= 1, got '64'"),
    ],
    ids=["no-canvas", "zero-canvas", "string-hidden-size"],
)
def test_bad_config_value_names_the_file(ckpt, edit, message):
    edit_config(ckpt, edit)
    with pytest.raises(ValueError, match=rf"config\.json: {message}"):
        load_model(ckpt)


def test_missing_weight(ckpt):
    key = "model.decoder.layers.0.mlp.up_proj.weight"
    rewrite_weights(ckpt, lambda w: w.pop(key))
    with pytest.raises(ValueError, match=rf"missing.*{key}"):
        load_model(ckpt)


def test_unexpected_weight(ckpt):
    key = "model.decoder.layers.0.bogus.weight"
    rewrite_weights(ckpt, lambda w: w.update({key: np.ones(64, np.float32)}))
    with pytest.raises(ValueError, match=rf"unexpected.*{key}"):
        load_model(ckpt)


def test_misshaped_weight(ckpt):
    key = "model.decoder.norm.weight"
    rewrite_weights(ckpt, lambda w: w.update({key: np.ones(65, np.float32)}))
    with pytest.raises(ValueError, match=rf"{key}.*\(65,\).*\(64,\)"):
        load_model(ckpt)


def test_encoder_biases_of_their_own(tmp_path):
    """transformers ties the encoder's weights to the decoder's but not its
    biases; a checkpoint whose encoder biases differ is one this port cannot run."""
    path = save_reference(build_reference(seed=0, attention_bias=True), tmp_path / "biased")
    key = "model.encoder.language_model.layers.1.self_attn.o_proj.bias"
    rewrite_weights(path, lambda w: w.update({key: w[key] + 0.5}))
    with pytest.raises(ValueError, match=rf"{key} differs from model.decoder.layers.1.self_attn.o_proj.bias"):
        load_model(path)


def test_truncated_safetensors(ckpt):
    f = ckpt / WEIGHTS
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=WEIGHTS):
        load_model(ckpt)


def test_sharded_checkpoint_and_missing_shard(ckpt, reference_logits):
    weights = load_file(ckpt / WEIGHTS)
    keys = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, names in shards.items():
        save_file({k: weights[k] for k in names}, ckpt / name, metadata={"format": "pt"})
    weight_map = {k: name for name, names in shards.items() for k in names}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (ckpt / WEIGHTS).unlink()

    np.testing.assert_array_equal(logits(load_model(ckpt)), reference_logits)

    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors"):
        load_model(ckpt)


def test_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model(tmp_path / "nope")


def test_hub_repo_from_offline_cache(checkpoint, reference_logits, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--testorg--tiny"
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # so "testorg/tiny" is not a local relative path

    np.testing.assert_array_equal(logits(load_model("testorg/tiny")), reference_logits)
    with pytest.raises(FileNotFoundError, match="testorg/absent"):
        load_model("testorg/absent")


@pytest.fixture
def on_cpu():
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


def test_bfloat16_on_cpu(checkpoint, reference_logits, on_cpu):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(checkpoint, dtype="bfloat16")
        out = logits(model)
    user_warnings = [w for w in caught if issubclass(w.category, UserWarning)]
    assert len(user_warnings) == 1 and "float32" in str(user_warnings[0].message)
    decoder = model.model.decoder
    assert decoder.layers[0].experts.gate_up_proj.weight.dtype == mx.float32
    assert decoder.norm.weight.dtype == mx.bfloat16
    assert out.dtype == np.float32 and out.shape == (1, len(CANVAS), 320)
    assert np.isfinite(out).all()
    # This random tiny model is too sensitive for argmax agreement: rounding its weights
    # to bf16 moves logits by up to ~1.7, and the transformers reference in bf16 agrees
    # with its own float32 argmax on only ~50% of positions. So compare logit profiles:
    # observed ~0.95, while dropping the experts or one attention block gives ~0.35.
    corr = np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(out[0], reference_logits[0])])
    assert corr >= 0.9, corr


def test_bad_dtype(checkpoint):
    with pytest.raises(ValueError, match="int8"):
        load_model(checkpoint, dtype="int8")
