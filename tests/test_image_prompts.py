"""Image prompts against transformers' reference: the encoder with image
features and the bidirectional image-block mask, then the decoder's logits;
batches, chunked prefill, a replayed generation, the errors.

The tiny checkpoints have a sliding window of 8 and layer types sliding,
full, sliding, full: a mask error shows on the full layer before the last
(the last layer's keys and values are all the decoder reads of it)."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from transformers.cache_utils import DynamicCache

from mlx_diffusiongemma import diffusion_generate, load
from mlx_diffusiongemma.generate import prefill
from mlx_diffusiongemma.generate.prompts import prepare_prompts
from mlx_diffusiongemma.model import Images, chunk_bounds

from helpers.reference import build_vision_reference, save_reference
from helpers.replay import ReplayedRandomness, record_reference
from helpers.tiny_tokenizer import image_token_ids, token_id, write_tokenizer

C = 12
VISION = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, position_embedding_size=64, standardize=True)
IMAGE = image_token_ids()["image_token_id"]
TEXT = "why is the sky blue"


def _image(seed: int, height: int = 40, width: int = 30) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _checkpoint(path, seed: int, **text):
    reference = build_vision_reference(seed=seed, vision=VISION, use_bidirectional_attention="vision", **text)
    save_reference(reference, path)
    write_tokenizer(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1], "pad_token_id": 0}))
    return reference, *load(path)


@pytest.fixture(scope="module")
def vision_pair(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("vision"), seed=5)


def _reference_logits(reference, prompt, canvas, causal_images: bool = False) -> np.ndarray:
    ids = torch.tensor(np.array(prompt.ids)).reshape(1, -1)
    cache = DynamicCache(config=reference.config.get_text_config())
    with torch.no_grad():
        reference.model.encoder(
            input_ids=ids,
            pixel_values=torch.tensor(prompt.pixel_values),
            image_position_ids=torch.tensor(prompt.position_ids).long(),
            mm_token_type_ids=None if causal_images else (ids == IMAGE).long(),
            cache=cache,
        )
        return reference(decoder_input_ids=torch.tensor([canvas]), cache=cache).logits.numpy()


def _our_logits(model, prompt, canvas, chunk_size=None) -> np.ndarray:
    features = [model.embed_images(prompt.pixel_values, prompt.position_ids)]
    if chunk_size is None:
        cache = prefill(model, [prompt.ids], features)
    else:
        cache = model.make_cache()
        images = Images.place(np.array(prompt.ids)[None], features, IMAGE)
        model.encode(prompt.ids, cache, chunk_size=chunk_size, images=images)
    return np.array(model.decode(canvas, cache))


CASES = {
    "one image longer than the window": [_image(1)],
    "two images": [_image(2, 24, 36), _image(3, 30, 30)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_image_prompt_matches_reference(vision_pair, case):
    reference, model, tokenizer = vision_pair
    (prompt,) = prepare_prompts(TEXT, CASES[case], tokenizer, model, max_soft_tokens=70)
    assert all(n > 8 for n in prompt.counts)  # every block is longer than the sliding window
    canvas = list(range(3, 3 + C))
    theirs = _reference_logits(reference, prompt, canvas)
    ours = _our_logits(model, prompt, canvas)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    # the block is what makes them equal: causal image tokens are far off
    assert np.abs(_reference_logits(reference, prompt, canvas, causal_images=True) - theirs).max() > 1e-2
    # chunks that would cut a block move the cut: the same cache
    np.testing.assert_allclose(_our_logits(model, prompt, canvas, chunk_size=16), ours, atol=1e-5)


def test_prompt_holds_boi_soft_tokens_eoi(vision_pair):
    _, model, tokenizer = vision_pair
    (prompt,) = prepare_prompts(TEXT, CASES["two images"], tokenizer, model, max_soft_tokens=70)
    ids = np.array(prompt.ids).tolist()
    ids_of = image_token_ids()
    runs = []
    for i, t in enumerate(ids):
        if t == ids_of["boi_token_id"]:
            end = ids.index(ids_of["eoi_token_id"], i)
            assert set(ids[i + 1 : end]) == {IMAGE}
            runs.append(end - i - 1)
    assert runs == prompt.counts
    # images come before the text, in the user turn
    assert ids.index(token_id("why")) > max(i for i, t in enumerate(ids) if t == ids_of["eoi_token_id"])


def test_every_form_of_prompt_gives_the_same_ids(vision_pair):
    _, model, tokenizer = vision_pair
    images = CASES["two images"]
    (text,) = prepare_prompts(TEXT, images, tokenizer, model, max_soft_tokens=70)
    messages = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "image", "image": images[1]},
                                             {"type": "text", "text": TEXT}]}]
    (chat,) = prepare_prompts(messages, None, tokenizer, model, max_soft_tokens=70)
    (ids,) = prepare_prompts(np.array(text.ids).tolist(), images, tokenizer, model, max_soft_tokens=70)
    for other in (chat, ids):
        assert np.array(other.ids).tolist() == np.array(text.ids).tolist()
        np.testing.assert_array_equal(other.pixel_values, text.pixel_values)
    raw = prepare_prompts("<|image|> why <|image|> sky", images, tokenizer, model, use_chat_template=False, max_soft_tokens=70)
    assert int((np.array(raw[0].ids) == IMAGE).sum()) == sum(text.counts)


def test_images_are_never_ignored(vision_pair):
    _, model, tokenizer = vision_pair
    canvas = list(range(3, 3 + C))
    logits = [
        _our_logits(model, prepare_prompts(TEXT, [image], tokenizer, model, max_soft_tokens=70)[0], canvas)
        for image in (_image(7), _image(8))
    ]
    assert np.abs(logits[0] - logits[1]).max() > 1e-2


def test_a_batch_keeps_each_rows_images(vision_pair):
    """Each row of a batch (left-padded, mlx-lm's batch caches) gives the
    logits it gives alone, its images in order; generation runs through."""
    _, model, tokenizer = vision_pair
    prompts = [TEXT, "hello world", "the sky"]
    images = [[_image(2, 24, 36), _image(3)], None, [_image(3), _image(2, 24, 36)]]
    prepared = prepare_prompts(prompts, images, tokenizer, model, max_soft_tokens=70)
    features = [model.embed_images(p.pixel_values, p.position_ids) if p.counts else None for p in prepared]
    canvas = mx.array([list(range(3, 3 + C))] * len(prompts))
    batch = np.array(model.decode(canvas, prefill(model, [p.ids for p in prepared], features)))
    for r, p in enumerate(prepared):
        alone = np.array(model.decode(canvas[:1], prefill(model, [p.ids], [features[r]])))[0]
        np.testing.assert_allclose(batch[r], alone, atol=2e-5, err_msg=f"row {r}")
    responses = diffusion_generate(model, tokenizer, prompts, images=images, seed=0, max_tokens=2 * C,
                                   max_denoising_steps=4, max_soft_tokens=70)
    assert [r.prompt_tokens for r in responses] == [p.ids.size for p in prepared]


def test_replayed_generation_with_an_image(tmp_path):
    """transformers' generate with pixel values, draw for draw: the same tokens."""
    reference, model, tokenizer = _checkpoint(tmp_path, seed=6)
    with torch.no_grad():  # well separated logits (see test_generate_replay.separated_checkpoint)
        reference.model.decoder.norm.weight.mul_(4.0)
        reference.model.decoder.self_conditioning.down_proj.weight.mul_(0.01)
    save_reference(reference, tmp_path)
    model, tokenizer = load(tmp_path)
    images = [_image(1)]
    (prompt,) = prepare_prompts(TEXT, images, tokenizer, model, max_soft_tokens=70)
    ids = np.array(prompt.ids).tolist()
    recording = record_reference(
        reference, ids, seed=0, max_new_tokens=3 * C, eos_token_id=[], pad_token_id=0,
        pixel_values=torch.tensor(prompt.pixel_values), image_position_ids=torch.tensor(prompt.position_ids).long(),
        mm_token_type_ids=(torch.tensor([ids]) == IMAGE).long(),
    )
    ours = diffusion_generate(
        model, None, ids, images=images, max_soft_tokens=70, randomness=ReplayedRandomness(recording),
        max_tokens=3 * C, eos_token_id=[], pad_token_id=0,
    )
    np.testing.assert_array_equal(ours.tokens, recording.sequence)


def test_chunk_bounds_never_split_a_block():
    blocks = np.full((1, 40), -1)
    blocks[0, 5:25] = 0  # a block of 20
    blocks[0, 30:32] = 1
    images = Images(mx.zeros((22, 4)), np.where(blocks >= 0, 0, -1), blocks)
    bounds = chunk_bounds(40, 8, images)
    assert bounds == [(0, 5), (5, 25), (25, 33), (33, 40)]
    assert chunk_bounds(40, 6, images) == [(0, 5), (5, 25), (25, 30), (30, 36), (36, 40)]
    assert chunk_bounds(40, 8, images, shortest=2)[-1][1] - chunk_bounds(40, 8, images, shortest=2)[-1][0] >= 2
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(9, 4, shortest=2) == [(0, 4), (4, 7), (7, 9)]


def test_errors_name_the_problem(vision_pair, tmp_path):
    _, model, tokenizer = vision_pair
    two = CASES["two images"]
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\) .* but 2 image\(s\) were given"):
        prepare_prompts("<|image|> sky", two, tokenizer, model, use_chat_template=False, max_soft_tokens=70)
    (prompt,) = prepare_prompts(TEXT, two[:1], tokenizer, model, max_soft_tokens=70)
    with pytest.raises(ValueError, match=rf"holds {prompt.counts[0]} image soft token\(s\) .* 2 image\(s\) give {sum(prepare_prompts(TEXT, two, tokenizer, model, max_soft_tokens=70)[0].counts)}"):
        prepare_prompts(np.array(prompt.ids).tolist(), two, tokenizer, model, max_soft_tokens=70)
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        diffusion_generate(model, tokenizer, TEXT, images=[corrupt])
    with pytest.raises(ValueError, match="one entry .* per prompt, 2 in all"):
        diffusion_generate(model, tokenizer, [TEXT, TEXT], images=[[two[0]]])
    messages = [{"role": "user", "content": [{"type": "image", "image": two[0]}, {"type": "text", "text": TEXT}]}]
    with pytest.raises(ValueError, match="both in its messages and as images="):
        diffusion_generate(model, tokenizer, messages, images=two[:1])
    with pytest.raises(ValueError, match="max_soft_tokens must be one of"):
        diffusion_generate(model, tokenizer, TEXT, images=two[:1], max_soft_tokens=100)
    with pytest.raises(ValueError, match="max_soft_tokens must be one of"):
        diffusion_generate(model, tokenizer, TEXT, max_soft_tokens=100)  # without images too
    url = [{"role": "user", "content": [{"type": "image", "url": "https://example.com/x.png"}, {"type": "text", "text": TEXT}]}]
    with pytest.raises(ValueError, match="image URLs are not fetched"):
        diffusion_generate(model, tokenizer, url)
    with pytest.warns(UserWarning, match="no images were given"):
        prepare_prompts(np.array(prompt.ids).tolist(), None, tokenizer, model)


@pytest.fixture(scope="module")
def text_only(tmp_path_factory, vision_pair):
    """The vision checkpoint with its vision tensors removed."""
    path = tmp_path_factory.mktemp("text_only")
    reference = build_vision_reference(seed=5, vision=VISION, use_bidirectional_attention="vision")
    save_reference(reference, path)
    file = path / "model.safetensors"
    weights = {k: v for k, v in mx.load(str(file)).items() if not k.startswith(("model.encoder.vision", "model.encoder.embed_vision"))}
    mx.save_safetensors(str(file), weights, metadata={"format": "pt"})
    write_tokenizer(path)
    return path


def test_a_text_only_checkpoint_loads_and_refuses_images(text_only, vision_pair):
    model, tokenizer = load(text_only)
    assert not model.has_vision
    assert not any(k.startswith(("model.encoder.vision", "model.encoder.embed_vision")) for k, _ in tree_flatten(model.parameters()))
    with pytest.raises(ValueError, match="no vision tower"):
        diffusion_generate(model, tokenizer, TEXT, images=[_image(1)])
    # text generation is unchanged by the tower's presence
    _, with_tower, _ = vision_pair
    kwargs = dict(max_tokens=C, seed=0, max_denoising_steps=4)
    assert diffusion_generate(model, tokenizer, TEXT, **kwargs).tokens == diffusion_generate(with_tower, tokenizer, TEXT, **kwargs).tokens


def test_the_tower_is_read_only_for_images(tmp_path):
    """A model used for text never holds the tower: its tensors are read from
    the file at the first image."""
    big = dict(VISION, hidden_size=128, intermediate_size=512, num_hidden_layers=4, head_dim=32)
    reference = build_vision_reference(seed=9, vision=big, use_bidirectional_attention="vision")
    save_reference(reference, tmp_path)
    write_tokenizer(tmp_path)
    tower_bytes = sum(p.numel() * 4 for n, p in reference.named_parameters() if n.startswith("model.encoder.vision_tower."))
    mx.clear_cache()
    before = mx.get_active_memory()
    model, tokenizer = load(tmp_path)
    loaded = mx.get_active_memory() - before
    diffusion_generate(model, tokenizer, TEXT, max_tokens=C, max_denoising_steps=2, seed=0)
    text_only = mx.get_active_memory() - before
    (prompt,) = prepare_prompts(TEXT, [_image(1)], tokenizer, model, max_soft_tokens=70)
    mx.eval(model.embed_images(prompt.pixel_values, prompt.position_ids))
    with_tower = mx.get_active_memory() - before
    assert loaded < tower_bytes and text_only < tower_bytes
    assert with_tower - text_only >= tower_bytes


def test_saving_keeps_the_vision_weights(vision_pair, tmp_path):
    from mlx_diffusiongemma.load import save_model, quantize

    reference, model, tokenizer = vision_pair
    config = json.loads((reference.config.to_json_string()))
    saved = save_model(model, tmp_path / "saved", config)
    names = set(mx.load(str(next(saved.glob("*.safetensors")))).keys())
    vision = {k for k, _ in tree_flatten(model.parameters()) if k.startswith("model.encoder.vision")}
    assert vision and vision <= names
    reloaded, _ = load(saved)
    (prompt,) = prepare_prompts(TEXT, [_image(1)], tokenizer, model, max_soft_tokens=70)
    canvas = list(range(3, 3 + C))
    np.testing.assert_array_equal(_our_logits(reloaded, prompt, canvas), _our_logits(model, prompt, canvas))
    # the quantization recipe never touches the tower
    quantized, _ = load(saved)
    quantize(quantized, bits=4, group_size=32)
    assert not any(k.startswith("model.encoder.vision") and k.endswith(".scales") for k, _ in tree_flatten(quantized.parameters()))


def test_training_keeps_the_tower_as_loaded(vision_pair, tmp_path):
    """Full fine-tuning updates the text model only, and its checkpoint
    keeps the vision weights (mlx-vlm reads them)."""
    from mlx_diffusiongemma.train import TrainingArgs, make_blocks, train

    reference, _, tokenizer = vision_pair
    path = tmp_path / "source"
    save_reference(reference, path)
    write_tokenizer(path)
    model, _ = load(path)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if ".vision_tower." in k or ".embed_vision." in k}
    blocks = make_blocks([2, 5, 9], [7] * 10, canvas_length=C, eos=1, pad=0)
    args = TrainingArgs(iters=2, batch_size=2, warmup=1, eval_every=100, eval_batches=1, save_every=2, weight_decay=0.1)
    train(model, json.loads((path / "config.json").read_text()), blocks * 4, blocks, tmp_path / "out", args,
          source=path, log=lambda *_: None)
    saved = mx.load(str(next((tmp_path / "out").glob("model*.safetensors"))))
    assert before and all(np.array_equal(saved[k], v) for k, v in before.items())
    reloaded, _ = load(tmp_path / "out")
    assert reloaded.has_vision


def test_loading_a_tower_leaves_the_random_state(vision_pair, text_only):
    """mlx_lm.generate --seed seeds, then loads (text only); ours loads the
    tower too and must leave mx.random where a text-only load leaves it."""
    _, _, _ = vision_pair
    reference_path = text_only.parent / "with_tower"
    if not reference_path.exists():
        save_reference(build_vision_reference(seed=5, vision=VISION, use_bidirectional_attention="vision"), reference_path)
        write_tokenizer(reference_path)
    draws = []
    for path in (text_only, reference_path):
        mx.random.seed(123)
        model, _ = load(path)
        assert model.has_vision == (path == reference_path)
        draws.append(np.array(mx.random.uniform(shape=(4,))))
    np.testing.assert_array_equal(draws[0], draws[1])
