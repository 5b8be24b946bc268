"""diffusion_generate's behaviour: options, eos and length handling, seeds,
streaming, chat rendering. The reference replay lives in test_generate_replay.py."""

from types import MappingProxyType, SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_tokenizer

from mlx_diffusiongemma import Randomness, diffusion_generate, load, stream_diffusion_generate
from mlx_diffusiongemma import chat
from mlx_diffusiongemma.chat import render_prompt, split_thinking
from mlx_diffusiongemma.generate import Commit, DiffusionOptions, DiffusionResponse, Draft

from helpers.tiny_tokenizer import token_id

V, C = 40, 6


class ScriptedModel:
    """Answers each canvas with one-hot logits for a scripted canvas, so the
    sampler converges in two steps (stable and confident)."""

    def __init__(self, canvases, generation_config=None, context=4096):
        self.script = [mx.array(c) for c in canvases]
        self.args = SimpleNamespace(
            canvas_length=C, vocab_size=V, max_position_embeddings=context, final_logit_softcapping=30.0,
            image_token_id=-1,  # no prompt holds it
        )
        self.dtype = mx.float32
        self.generation_config = MappingProxyType(generation_config or {})
        self.encoded, self.decoded = [], []

    def make_cache(self):
        return []

    def encode(self, ids, cache, chunk_size=512, images=None):
        self.encoded.append(np.array(ids).ravel().tolist())

    def decode(self, canvas, cache, **self_conditioning):
        self.decoded.append(np.array(canvas).ravel().tolist())
        target = self.script[len(self.encoded) - 2]
        return 30.0 * (mx.arange(V) == target[:, None]).astype(mx.float32)[None]


def _run(model, **kwargs):
    kwargs.setdefault("seed", 0)
    return diffusion_generate(model, None, [3, 4, 5], **kwargs)


def test_eos_stops_and_truncates():
    model = ScriptedModel([[5, 6, 7, 8, 9, 10], [11, 1, 12, 13, 14, 15], [16] * 6])
    r = _run(model, eos_token_id=1, pad_token_id=0, max_tokens=18)
    assert r.tokens == [5, 6, 7, 8, 9, 10, 11] and r.finish_reason == "stop"
    assert r.canvases == 2 and r.denoising_steps == 4  # two steps per canvas: stable and confident
    # the prompt (its last token alone, as mlx-lm prefills), then the first canvas; never the last
    assert model.encoded == [[3, 4], [5], [5, 6, 7, 8, 9, 10]]
    assert r.tokens_per_forward == pytest.approx(8 / 4)  # the reference counts eos, not the padding after it
    assert r.prompt_tokens == 3 and r.generation_tokens == 7


def test_max_tokens_rounds_up_to_canvases_and_trims_the_response():
    model = ScriptedModel([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 1, 15]])
    r = _run(model, eos_token_id=[1], max_tokens=8)
    assert r.canvases == 2 and r.tokens == [5, 6, 7, 8, 9, 10, 11, 12]
    assert r.finish_reason == "length"  # the eos lies past max_tokens
    r = _run(ScriptedModel([[5, 6, 7, 8, 9, 10]] * 2), eos_token_id=[], max_tokens=6)
    assert r.canvases == 1 and r.finish_reason == "length" and len(r.tokens) == 6


def test_empty_eos_list_disables_eos_and_checkpoint_defaults_apply():
    config = {"eos_token_id": [1], "max_new_tokens": 12, "max_denoising_steps": None}
    r = _run(ScriptedModel([[1] * 6, [2] * 6], generation_config=config))
    assert r.finish_reason == "stop" and r.tokens == []
    r = _run(ScriptedModel([[1] * 6, [2] * 6], generation_config=config), eos_token_id=[])
    assert r.canvases == 2 and r.tokens == [1] * 6 + [2] * 6  # max_new_tokens from the checkpoint


def test_option_precedence():
    model = SimpleNamespace(
        args=SimpleNamespace(vocab_size=V),
        generation_config={"t_min": 0.2, "t_max": None, "sampler_config": {"entropy_bound": 0.5, "_cls_name": "x"},
                           "max_new_tokens": 64, "stability_threshold": 2, "transformers_version": "5.23"},
    )
    tokenizer = SimpleNamespace(eos_token_ids={7, 3})
    options = DiffusionOptions.resolve(model, tokenizer, {"stability_threshold": 0, "confidence_threshold": None})
    assert (options.t_min, options.t_max, options.entropy_bound, options.max_tokens) == (0.2, 0.8, 0.5, 64)
    assert options.stability_threshold == 0 and options.confidence_threshold == 0.005
    assert options.eos_token_id == (3, 7)  # no eos in the generation config: the tokenizer's


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("t_max", 0.3, "t_max must be greater than t_min"),
        ("t_min", -0.1, "t_min must be a number >= 0"),
        ("entropy_bound", 0.0, "entropy_bound must be a number > 0"),
        ("max_denoising_steps", 0, "max_denoising_steps must be an integer >= 1"),
        ("max_denoising_steps", 2.5, "max_denoising_steps must be an integer"),
        ("stability_threshold", -1, "stability_threshold must be an integer >= 0"),
        ("confidence_threshold", 0, "confidence_threshold must be a number > 0"),
        ("max_tokens", 0, "max_tokens must be an integer >= 1"),
        ("eos_token_id", [1, V], "eos_token_id must hold token ids in"),
        ("acceptance", "greedy", "acceptance must be one of"),
        ("min_confidence", 1.5, "min_confidence must be in"),
        ("min_confidence", "high", r"min_confidence must be in \(0, 1\], got 'high'"),
        ("t_max", float("inf"), "t_max must be a number >= 0, got inf"),
    ],
)
def test_invalid_options_are_named(option, value, message):
    with pytest.raises(ValueError, match=message):
        _run(ScriptedModel([[5] * 6]), **{option: value})


@pytest.mark.parametrize(
    "prompt,kwargs,error,message",
    [
        ([], {}, ValueError, "prompt is empty"),
        ("   ", {}, ValueError, "prompt is empty"),
        ([3, V], {}, ValueError, r"prompt holds ids outside \[0, 40\)"),
        (np.array([[1, 2], [3, 4]]), {}, ValueError, "1-D sequence of token ids"),  # a list of them is a batch
        ("hello", {}, ValueError, "a text prompt needs a tokenizer"),
        ([3] * 20, {}, ValueError, "does not fit the model's context of 24 tokens"),
        ([3], {"decoder_input_ids": [1, 2]}, ValueError, r"decoder_input_ids must hold exactly canvas_length=6 ids \(one whole canvas\), got shape \[2\]"),
        ([3], {"seed": 1, "randomness": Randomness(1)}, ValueError, "either seed or randomness"),
        ([3], {"seed": -1}, ValueError, r"seed must be an integer in \[0, 2\*\*64\), got -1"),
        ([3], {"seed": "1"}, ValueError, r"seed must be an integer in \[0, 2\*\*64\), got '1'"),
        ([3], {"temperature": 0.5}, TypeError, "unknown generation option"),
    ],
)
def test_bad_prompts_and_arguments(prompt, kwargs, error, message):
    with pytest.raises(error, match=message):
        diffusion_generate(ScriptedModel([[5] * 6], context=24), None, prompt, **kwargs)


def test_decoder_input_ids_start_the_first_canvas_only():
    model = ScriptedModel([[5] * 6, [6] * 6])
    _run(model, decoder_input_ids=[9, 8, 7, 6, 5, 4], max_tokens=12, eos_token_id=[])
    assert model.decoded[0] == [9, 8, 7, 6, 5, 4]
    assert model.decoded[2] != [9, 8, 7, 6, 5, 4]  # the second canvas starts random


def test_seeds_reproduce_and_global_state_controls_unseeded(chat_checkpoint):
    model, tokenizer = load(chat_checkpoint)
    run = lambda **kw: diffusion_generate(model, tokenizer, "why is the sky blue", max_tokens=12, max_denoising_steps=4, **kw)
    assert run(seed=5).tokens == run(seed=5).tokens
    assert run(seed=5).tokens != run(seed=6).tokens
    mx.random.seed(9)
    first = run().tokens
    mx.random.seed(9)
    assert run().tokens == first


def test_streaming_yields_drafts_while_working(chat_checkpoint):
    model, tokenizer = load(chat_checkpoint)
    encodes = []
    model_encode = model.encode
    model.encode = lambda ids, cache, **kw: (encodes.append(len(np.array(ids).ravel())), model_encode(ids, cache, **kw))
    events = stream_diffusion_generate(model, tokenizer, "hello world", seed=0, max_tokens=24, max_denoising_steps=3,
                                       eos_token_id=[])
    first = next(events)
    prompt_length = len(render_prompt(tokenizer, "hello world"))
    assert isinstance(first, Draft) and encodes == [prompt_length - 1, 1]  # only the prompt so far
    assert first.step == 1 and first.accepted >= 1 and first.mean_entropy > 0 and len(first.tokens) == 12
    assert first.text == tokenizer.decode(first.tokens)
    rest = list(events)
    kinds = [type(e).__name__ for e in [first] + rest]
    assert kinds == ["Draft"] * 3 + ["Commit"] + ["Draft"] * 3 + ["Commit", "DiffusionResponse"]
    final = rest[-1]
    assert isinstance(final, DiffusionResponse)
    assert "".join(e.text for e in rest if isinstance(e, Commit)).split() == tokenizer.decode(final.tokens).split()
    assert final.denoising_steps == 6 and final.tokens_per_forward == pytest.approx(24 / 6)
    assert final.peak_memory > 0 and final.prompt_tps > 0 and final.generation_tps > 0 and final.wall_time > 0


def test_chat_template_and_thinking(chat_checkpoint):
    tokenizer = load_tokenizer(chat_checkpoint, eos_token_ids=[1, 4])
    ids = render_prompt(tokenizer, "hello", system_prompt="sky", enable_thinking=True)
    assert tokenizer.decode(ids).split() == "<bos> <|turn> system <|think|> sky <turn|> <|turn> user hello <turn|> <|turn> model".split()
    ids = render_prompt(tokenizer, "hello")
    assert tokenizer.decode(ids).split() == "<bos> <|turn> user hello <turn|> <|turn> model".split()
    assert render_prompt(tokenizer, "hello world", use_chat_template=False) == [token_id("hello"), token_id("world")]

    channel, close = token_id("<|channel>"), token_id("<channel|>")
    thought, why, sky, blue = (token_id(w) for w in ("thought", "why", "sky", "blue"))
    assert split_thinking(tokenizer, [channel, thought, why, close, sky, blue]) == ("why", "sky blue")
    assert split_thinking(tokenizer, [channel, thought, why, sky]) == ("why sky", "")  # still thinking
    assert split_thinking(tokenizer, [sky, blue]) == ("", "sky blue")


@pytest.fixture(scope="module")
def demo_tokenizer():
    from mlx_diffusiongemma.demo import DEMO_DIR

    return load_tokenizer(DEMO_DIR)


@pytest.mark.parametrize("prompt,unknown", [("abc", "'a', 'b', 'c'"), ("4a3 2a", "'a', ' '")])
def test_unknown_characters_are_refused(demo_tokenizer, prompt, unknown):
    message = rf"the prompt holds characters the tokenizer does not know: {unknown} \(the single characters it knows: 0123456789=\)$"
    with pytest.raises(ValueError, match=message):
        render_prompt(demo_tokenizer, prompt)
    with pytest.raises(ValueError, match=message):
        render_prompt(demo_tokenizer, prompt, use_chat_template=False)


def test_known_text_and_the_unknown_token_itself_pass(demo_tokenizer, monkeypatch):
    assert demo_tokenizer.unk_token_id == 0
    assert render_prompt(demo_tokenizer, "4321") == [2, 7, 6, 5, 4, 13]  # <bos> 4 3 2 1 =
    assert render_prompt(demo_tokenizer, "<pad>1") == [2, 0, 4, 13]  # typed on purpose
    monkeypatch.setattr(chat, "SMALL_VOCABULARY", 10)  # a large vocabulary is not listed
    with pytest.raises(ValueError, match=r"does not know: 'x'$"):
        render_prompt(demo_tokenizer, "x")


def test_unknown_combination_of_known_characters(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert render_prompt(tokenizer, "a b") == [1, 2]
    with pytest.raises(ValueError, match=r"^the tokenizer does not know parts of the prompt \(it encodes them as <unk>\)"):
        render_prompt(tokenizer, "a ab")


def test_typing_the_unknown_token_excuses_only_itself(demo_tokenizer):
    """Typed <pad> is allowed as often as it is typed; it does not let an
    unknown character through, in the prompt or beside a system prompt."""
    with pytest.raises(ValueError, match=r"does not know: 'a'"):
        render_prompt(demo_tokenizer, "<pad>1a")
    with pytest.raises(ValueError, match=r"does not know: 'a', 'b', 'c'"):
        render_prompt(demo_tokenizer, "abc", system_prompt="<pad>")


def test_the_demo_template_refuses_unknown_characters_for_every_tool(demo_tokenizer):
    """mlx-lm renders the template itself (its server, its commands): the template says it there."""
    import jinja2

    with pytest.raises(jinja2.TemplateError, match=r'^the demo model knows the characters 0123456789= only, not "a"$'):
        demo_tokenizer.apply_chat_template([{"role": "user", "content": "1a"}], add_generation_prompt=True)
    assert demo_tokenizer.apply_chat_template([{"role": "user", "content": " <pad>12 "}], add_generation_prompt=True) == [2, 0, 4, 5, 13]


def test_demo_pads_read_as_nothing(demo_tokenizer):
    """mlx-lm's detokenizers print every token: the demo's <pad> decodes to
    nothing, as transformers' decode(skip_special_tokens=True) reads it."""
    detokenizer = demo_tokenizer.detokenizer
    for t in [4, 0, 0, 5]:
        detokenizer.add_token(t)
    detokenizer.finalize()
    assert detokenizer.text == "12" == demo_tokenizer.decode([4, 0, 0, 5], skip_special_tokens=True)


def test_a_text_that_cannot_fit_is_refused_before_tokenizing(demo_tokenizer, monkeypatch):
    model, _ = load("demo")
    encoded = []
    monkeypatch.setattr(type(demo_tokenizer._tokenizer), "encode", lambda *a, **k: encoded.append(1))
    with pytest.raises(ValueError, match=r"^the prompt has 30000 characters: more tokens than the model's context of 4096 "):
        diffusion_generate(model, demo_tokenizer, "7" * 30_000)
    assert encoded == []


@pytest.mark.parametrize(
    "options,message",
    [
        ({"t_max": 1e39}, "t_max must be a number float32 holds"),
        ({"t_min": 0.0, "t_max": 1e-300}, "t_max must be greater than t_min in float32"),
        ({"confidence_threshold": 1e-46}, "confidence_threshold must be a number float32 holds"),
        ({"min_confidence": 1e-300}, r"min_confidence must be in \(0, 1\]"),
        ({"t_max": 10**400}, "t_max must be a number float32 holds"),
        ({"self_conditioning_k": 2**31}, r"self_conditioning_k must be an integer below 2\*\*31"),
    ],
)
def test_options_the_sampler_cannot_hold_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        DiffusionOptions.check(options)


@pytest.mark.parametrize("eos", [1.5, -1e39, "x", [1, 2.5]])
def test_eos_ids_that_are_not_ids_are_refused(eos):
    model, tokenizer = load("demo")
    with pytest.raises(ValueError, match=r"^eos_token_id must hold token ids in \[0, 14\)"):
        DiffusionOptions.resolve(model, tokenizer, {"eos_token_id": eos})


@pytest.mark.parametrize("options", [{"entropy_bound": 3.5e38}, {"confidence_threshold": 10**400}])
def test_positive_options_past_float32_are_refused(options):
    with pytest.raises(ValueError, match=r"must be a number float32 holds"):
        DiffusionOptions.check(options)
