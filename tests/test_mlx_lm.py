"""mlx-lm drives DiffusionGemma unchanged: `mlx_lm.load`, `mlx_lm.generate`,
`mlx_lm.chat`, `mlx_lm.server` and the prompt-cache helpers, through the
import hook this package installs (mlx_diffusiongemma.pth)."""

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlx.core as mx
import mlx_lm
import mlx_diffusiongemma
import numpy as np
import pytest
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

from mlx_diffusiongemma import Model, diffusion_generate, load
from mlx_diffusiongemma.generate import DiffusionResponse

from helpers.server import post, serving
from helpers.tiny_tokenizer import token_id

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "why is the sky blue"


@pytest.fixture(scope="module", autouse=True)
def hook_installed():
    assert "_mlx_diffusiongemma_hook" in sys.modules, (
        "the mlx-lm hook is not active: install the package (pip install -e .) so mlx_diffusiongemma.pth runs"
    )


def _ours(path, prompt_ids, seed, max_tokens, seed_before_load=False):
    """Our generate with mlx's global seed set where the mlx-lm tool sets it:
    the CLIs seed before loading (loading draws the initial weights), the
    server per request."""
    if seed_before_load:
        mx.random.seed(seed)
    model, tokenizer = load(path)
    if not seed_before_load:
        mx.random.seed(seed)
    return model, tokenizer, diffusion_generate(model, tokenizer, prompt_ids, max_tokens=max_tokens)


def _run(args, **kwargs):
    result = subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, **kwargs,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_load_returns_our_model_and_caches_round_trip(chat_checkpoint, tmp_path):
    model, tokenizer = mlx_lm.load(str(chat_checkpoint))
    assert isinstance(model, Model) and hasattr(model, "diffusion_generate")
    assert tokenizer.eos_token_ids == {1, 4}
    cache = make_prompt_cache(model)
    model.encode(list(range(5, 20)), cache)
    canvas = list(range(20, 32))
    expected = np.array(model.decode(canvas, cache))
    save_prompt_cache(str(tmp_path / "cache.safetensors"), cache)
    restored = load_prompt_cache(str(tmp_path / "cache.safetensors"))
    np.testing.assert_array_equal(np.array(model.decode(canvas, restored)), expected)


def test_stream_generate_matches_diffusion_generate(chat_checkpoint):
    mx.random.seed(3)
    model, tokenizer = mlx_lm.load(str(chat_checkpoint))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        enable_thinking=False)
    mx.random.seed(3)
    theirs = [r.token for r in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=30)]
    _, _, ours = _ours(chat_checkpoint, ids, 3, 30)
    assert theirs[: len(ours.tokens)] == ours.tokens
    if ours.finish_reason == "stop":
        assert theirs[len(ours.tokens)] in tokenizer.eos_token_ids
    else:
        assert len(theirs) == 30


def test_diffusion_generate_hook_streams_our_events(chat_checkpoint):
    model, tokenizer = mlx_lm.load(str(chat_checkpoint))
    events = list(model.diffusion_generate([2, 9, 16], tokenizer=tokenizer, seed=0, max_tokens=12,
                                           max_denoising_steps=2))
    assert isinstance(events[-1], DiffusionResponse) and events[-1].denoising_steps == 2


def test_mlx_lm_generate_prints_our_text(chat_checkpoint):
    args = ["--model", str(chat_checkpoint), "--prompt", PROMPT, "--seed", "1", "--max-tokens", "24"]
    theirs = _run(["mlx_lm", "generate", *args, "--chat-template-config", '{"enable_thinking": false}'])
    text = theirs.split("==========\n")[1].rstrip("\n")
    _, tokenizer, ours = _ours(chat_checkpoint, _prompt_ids(chat_checkpoint), 1, 24, seed_before_load=True)
    assert text == tokenizer.decode(ours.tokens)
    assert _run(["mlx_diffusiongemma.generate", *args]).splitlines()[0] == ours.text


def _prompt_ids(path):
    _, tokenizer = mlx_lm.load(str(path))
    return tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                         enable_thinking=False)


def test_mlx_lm_chat_two_turns(chat_checkpoint):
    out = _run(["mlx_lm", "chat", "--model", str(chat_checkpoint), "--max-tokens", "12"],
               input="hello\nwhy is the sky blue\nq\n")
    assert out.count(" tokens · ") == 2  # one statistics line per answered turn


@pytest.fixture(scope="module")
def server(chat_checkpoint):
    with serving(chat_checkpoint) as url:
        yield url


def _streamed_text(body: str, key) -> str:
    chunks = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    return "".join(key(c["choices"][0]) or "" for c in chunks)


def test_server_completions_match_ours(server, chat_checkpoint):
    # temperature 0: a sampling temperature would pick the same (one-hot) tokens but
    # draw from the global random state between our draws. Three prompt tokens:
    # with two, mlx-lm prefills a one-token chunk, which costs a canvas (see mlx_lm_model).
    body = {"prompt": "hello world sky", "max_tokens": 12, "seed": 5, "temperature": 0.0}
    text = json.loads(post(f"{server}/v1/completions", body))["choices"][0]["text"]
    _, tokenizer, ours = _ours(chat_checkpoint, [token_id("hello"), token_id("world"), token_id("sky")], 5, 12)
    assert text == tokenizer.decode(ours.tokens)
    streamed = post(f"{server}/v1/completions", {**body, "stream": True})
    assert _streamed_text(streamed, lambda c: c.get("text")) == text


def test_server_chat_completions_streamed_and_not(server, chat_checkpoint):
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 12, "seed": 7, "temperature": 0.0,
            "chat_template_kwargs": {"enable_thinking": False}}
    reply = json.loads(post(f"{server}/v1/chat/completions", body))
    text = reply["choices"][0]["message"]["content"]
    _, tokenizer, ours = _ours(chat_checkpoint, _prompt_ids(chat_checkpoint), 7, 12)
    assert text == tokenizer.decode(ours.tokens) and reply["usage"]["completion_tokens"] >= len(ours.tokens)
    streamed = post(f"{server}/v1/chat/completions", {**body, "stream": True})
    assert _streamed_text(streamed, lambda c: c.get("delta", {}).get("content")) == text


def test_hook_is_inert_and_mlx_lm_untouched():
    # A process that never asks for the model type imports nothing of ours, of mlx or of mlx-lm.
    out = subprocess.run(
        [sys.executable, "-c", "import sys; print(sorted(m for m in sys.modules if m.startswith(('mlx', 'mlx_lm'))))"],
        capture_output=True, text=True, cwd="/",
    ).stdout
    assert out.strip() == "[]"
    # Every file of the installed mlx-lm still has the hash pip recorded, and mlx-lm has no diffusion_gemma module.
    from importlib.metadata import distribution, distributions

    changed = [
        str(f) for f in distribution("mlx-lm").files
        if f.hash is not None and _sha256(f.locate()) != f.hash.value
    ]
    assert changed == []
    assert not any("diffusion_gemma" in str(f) for f in distribution("mlx-lm").files)
    # The .pth is in our installed distribution's RECORD, so uninstalling removes it.
    records = [d.read_text("RECORD") or "" for d in distributions() if d.metadata["Name"] == "mlx-diffusiongemma"]
    assert any("mlx_diffusiongemma.pth," in record for record in records)


def _sha256(path) -> str:
    import base64
    import hashlib

    return base64.urlsafe_b64encode(hashlib.sha256(Path(path).read_bytes()).digest()).rstrip(b"=").decode()


# The demo model with a chat template that renders every turn (the shipped one
# renders the last message only), so a chat's next request extends the cached one.
MULTI_TURN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] | trim }}"
    "{% if m['role'] == 'user' %}={% else %}<eos>{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo")
    shutil.copytree(Path(mlx_diffusiongemma.__file__).parent / "demo_model", path, dirs_exist_ok=True)
    (path / "chat_template.jinja").write_text(MULTI_TURN_TEMPLATE)
    return path


def _request(url, kind, payload, seed, stream):
    body = {**payload, "max_tokens": 12, "seed": seed, "temperature": 0.0, "stream": stream}
    reply = post(f"{url}/v1/{kind}", body)
    if kind == "completions":
        key = (lambda c: c.get("text")) if stream else None
    else:
        key = (lambda c: c.get("delta", {}).get("content")) if stream else None
    if stream:
        return _streamed_text(reply, key)
    choice = json.loads(reply)["choices"][0]
    return choice["text"] if kind == "completions" else choice["message"]["content"]


def _fresh_answer(model, tokenizer, kind, payload, seed) -> str:
    """What an independent request gets: mlx-lm's loop on a fresh cache, as the server runs it."""
    if kind == "completions":
        ids = tokenizer.encode(payload["prompt"])
    else:
        ids = tokenizer.apply_chat_template(payload["messages"], add_generation_prompt=True)
    mx.random.seed(seed)
    tokens = []
    for r in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=12):
        if r.token in tokenizer.eos_token_ids:
            break
        tokens.append(r.token)
    return tokenizer.decode(tokens)


def test_server_default_settings_answer_every_request_as_a_fresh_one(demo_checkpoint):
    """Repeated requests, prefixes shared with earlier requests, multi-turn chats
    and 16 concurrent requests, against mlx_lm.server with its default prompt
    cache: each answer is the one an independent request gets."""
    # 3 to 8 digits, as the demo was trained: its answers there are far from ties, so the rounding
    # differences between a cached prefix and a fresh prefill (about 1e-7) do not flip them
    digits = ["81502739", "81502739", "81502739", "8150273", "81502", "4321", "43210", "990011"]
    requests = [("chat/completions", {"messages": [{"role": "user", "content": d}]}) for d in digits]
    requests += [("completions", {"prompt": f"<bos>{d}="}) for d in digits[:4]]
    chat = [{"role": "user", "content": "81502739"}, {"role": "assistant", "content": "01235789"},
            {"role": "user", "content": "4321"}]
    requests += [("chat/completions", {"messages": chat[:1]}), ("chat/completions", {"messages": chat}),
                 ("chat/completions", {"messages": chat + [{"role": "assistant", "content": "1234"},
                                                           {"role": "user", "content": "5501"}]})]
    model, tokenizer = mlx_lm.load(str(demo_checkpoint))
    expected = [_fresh_answer(model, tokenizer, kind, payload, seed) for seed, (kind, payload) in enumerate(requests)]
    assert expected[0] == "01235789"  # the demo model sorts digits

    with serving(demo_checkpoint) as url:
        # one after another: every request after the first finds a cached prefix
        answers = [_request(url, kind, payload, seed, stream=seed % 2 == 1)
                   for seed, (kind, payload) in enumerate(requests)]
        assert answers == expected
        # 16 at once, streamed and not
        jobs = [(seed % len(requests), seed % 2 == 0) for seed in range(16)]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(_request, url, *requests[i], i, stream) for i, stream in jobs]
            answers = [f.result() for f in futures]
        assert answers == [expected[i] for i, _ in jobs]


def _post_status(url, body) -> tuple:
    """(HTTP status, parsed body) of a POST, errors included."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_answers_around_overlong_and_unknown_requests():
    """The shipped demo under mlx_lm.server: a prompt far past the context ends
    at once (empty, with a warning on the server's log) and a prompt with
    characters the demo does not know is refused by its chat template, while
    a good request sent with them is answered right."""
    demo = Path(mlx_diffusiongemma.__file__).parent / "demo_model"
    model, tokenizer = mlx_lm.load(str(demo))
    good = {"messages": [{"role": "user", "content": "81502739"}], "max_tokens": 16}
    expected = mlx_lm.generate(model, tokenizer, tokenizer.apply_chat_template(good["messages"], add_generation_prompt=True),
                               max_tokens=16)
    overlong = {"messages": [{"role": "user", "content": "7" * 20_000}], "max_tokens": 16}
    unknown = {"messages": [{"role": "user", "content": "abc"}], "max_tokens": 16}
    with serving(demo) as url:
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda body: _post_status(f"{url}/v1/chat/completions", body), [overlong, good, unknown]))
        seconds = time.perf_counter() - start
        after = _post_status(f"{url}/v1/chat/completions", good)
    (status, long_reply), (good_status, good_reply), (unknown_status, unknown_reply) = replies
    assert status == 200 and not long_reply["choices"][0]["message"]["content"]  # None: nothing generated
    assert long_reply["choices"][0]["finish_reason"] == "stop"
    assert good_status == 200 and good_reply["choices"][0]["message"]["content"] == expected == "01235789"
    assert unknown_status == 404 and unknown_reply["error"] == 'the demo model knows the characters 0123456789= only, not "a"'
    assert after[0] == 200 and after[1]["choices"][0]["message"]["content"] == expected
    assert seconds < 60, seconds
