"""The model's context through mlx-lm: a row with no room left for a canvas
ends with eos at once (one warning), whatever is fed past that room costs no
encoder pass, and the cache still describes every token fed. mlx-lm 0.32
gives a model no way to refuse a request before prefill (see mlx_lm_model)."""

import json
import logging
import shutil
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import mlx_diffusiongemma
import pytest
from mlx_lm.generate import batch_generate
from mlx_lm.models.cache import make_prompt_cache

from mlx_diffusiongemma import Model, diffusion_generate, load
from mlx_diffusiongemma.demo import prompt_ids

DEMO = Path(mlx_diffusiongemma.__file__).parent / "demo_model"
CONTEXT = 60  # five canvases of the demo's 12


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    """The demo model with a context of 60 tokens."""
    path = tmp_path_factory.mktemp("short")
    shutil.copytree(DEMO, path, dirs_exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = CONTEXT
    (path / "config.json").write_text(json.dumps(config))
    return path


def _stream(model, tokenizer, ids, max_tokens, seed=0, **kwargs) -> list:
    mx.random.seed(seed)
    return [r.token for r in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=max_tokens, **kwargs)]


def test_generation_ends_where_ours_does_at_the_context(short_demo):
    """A prompt the demo does not know keeps it writing: ours commits canvases
    until the context is full ("length"); mlx-lm hands out the same tokens,
    then eos."""
    model, tokenizer = mlx_lm.load(str(short_demo))
    ids = tokenizer.encode("<bos>12=34=", add_special_tokens=False)
    theirs = _stream(model, tokenizer, ids, max_tokens=200)
    mx.random.seed(0)
    ours_model, ours_tokenizer = load(short_demo)
    ours = diffusion_generate(ours_model, ours_tokenizer, ids, max_tokens=200, eos_token_id=[])
    assert ours.finish_reason == "length" and len(ours.tokens) == (CONTEXT - len(ids)) // 12 * 12
    eos = tokenizer.eos_token_ids
    kept = [t for t in ours.tokens]
    stop = next((i for i, t in enumerate(kept) if t in eos), len(kept))
    assert theirs[:stop] == kept[:stop] and theirs[stop] in eos and len(theirs) == stop + 1


def test_prompt_past_the_context_ends_at_once_with_one_warning(short_demo, caplog, monkeypatch):
    model, tokenizer = mlx_lm.load(str(short_demo))
    passes = []
    encode_chunk = Model.encode_chunk
    monkeypatch.setattr(Model, "encode_chunk", lambda self, ids, c: passes.append(ids.shape[1]) or encode_chunk(self, ids, c))
    ids = [2] + [4] * 20_000 + [13]
    cache = make_prompt_cache(model)
    with caplog.at_level(logging.WARNING):
        start = time.perf_counter()
        tokens = _stream(model, tokenizer, ids, max_tokens=16, prompt_cache=cache)
        seconds = time.perf_counter() - start
    assert tokens == [1]  # eos: nothing generated
    # mlx-lm prefills 2048 tokens a chunk: the first is encoded, the rest is past the room for a canvas
    assert sum(passes) == 2048, passes
    warnings = [r.getMessage() for r in caplog.records if "DiffusionGemma" in r.getMessage()]
    assert warnings == [
        f"DiffusionGemma: {len(ids)} token(s) leave no room for a canvas of 12 in the model's context of "
        f"{CONTEXT} tokens (max_position_embeddings): the sequence ends here (eos)"
    ]
    assert cache[0].offset == len(ids) + 1  # every token fed, the eos included: mlx-lm's prompt cache relies on it
    print(f"\n{len(ids)}-token prompt past a context of {CONTEXT}: {seconds:.2f} s")


def test_room_for_a_canvas_is_the_bound(short_demo):
    """A prompt that leaves exactly one canvas generates it; one token more generates nothing."""
    model, tokenizer = mlx_lm.load(str(short_demo))
    fits = [2] + [4] * (CONTEXT - 12 - 2) + [13]
    assert len(fits) + 12 == CONTEXT
    assert len(_stream(model, tokenizer, fits, max_tokens=30)) >= 1
    assert _stream(model, tokenizer, fits, max_tokens=30)[0] not in tokenizer.eos_token_ids
    assert _stream(model, tokenizer, [2, 4] + fits[1:], max_tokens=30) == [1]


def test_batch_rows_past_the_context_end_alone(short_demo):
    """mlx-lm's batch (the server's path): a row past the context ends empty,
    the others answer as alone."""
    model, tokenizer = mlx_lm.load(str(short_demo))
    prompts = [prompt_ids(tokenizer, "81502739"), [2] + [4] * 5000 + [13], prompt_ids(tokenizer, "4321")]
    alone = [mlx_lm.generate(model, tokenizer, p, max_tokens=16) for p in prompts]
    batch = batch_generate(model, tokenizer, prompts, max_tokens=16, prefill_batch_size=3, completion_batch_size=3)
    assert batch.texts == alone
    assert alone == ["01235789", "", "1234"]


@pytest.mark.parametrize("window", [8, 64], ids=["ring wraps", "window holds all"])
def test_rows_beside_a_row_past_the_context_are_encoded_alone(short_demo, tmp_path, window, monkeypatch):
    """A batch call where one row is past the context: that row gets zeros
    and no encoder pass; the other rows' keys and values are what encoding
    them alone writes (so nothing attends over the long row's cache)."""
    path = tmp_path / "model"
    shutil.copytree(short_demo, path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["sliding_window"] = window
    (path / "config.json").write_text(json.dumps(config))
    model, _ = mlx_lm.load(str(path))
    long, short, fed = list(range(3, 13)) * 5 + [3] * 5, [2, 5, 6], [[7, 8, 9, 10], [11, 12, 13, 3]]
    caches = [make_prompt_cache(model), make_prompt_cache(model)]
    model(mx.array([long]), caches[0])  # 55 tokens: no room left for a canvas of 12
    model(mx.array([short]), caches[1])
    batch = [c.merge([a, b]) for c, a, b in zip(caches[0], caches[0], caches[1])]
    rows = []
    encode_chunk = Model.encode_chunk
    monkeypatch.setattr(Model, "encode_chunk", lambda self, ids, c: rows.append(ids.shape[0]) or encode_chunk(self, ids, c))
    model(mx.array(fed), batch)
    monkeypatch.undo()
    assert rows == [1]  # the short row alone
    alone = make_prompt_cache(model)
    model(mx.array([short]), alone)
    model(mx.array([fed[1]]), alone)
    L = len(model.layers)
    for layer, own in zip(batch[:L], alone[:L]):
        ours_k, ours_v = (a[..., -4:, :] for a in layer.extract(1).state[:2])
        own_k, own_v = (a[..., own.offset - 4 : own.offset, :] if a.ndim else a for a in own.state[:2])
        assert mx.allclose(ours_k, own_k, atol=1e-6) and mx.allclose(ours_v, own_v, atol=1e-6)
        past_k, past_v = (a[..., -4:, :] for a in layer.extract(0).state[:2])
        assert not past_k.any() and not past_v.any()
