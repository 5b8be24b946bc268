"""Images, ours (mlx-diffusiongemma) side by side with mlx-vlm 0.7.10, on the
same saved random weights: the released vision tower's configuration on a small
text body, one 280-soft-token image.

    python benchmarks/vision.py                 # build (once, ~3 min), measure, compare (see below for time)
    python benchmarks/vision.py --repeats 5 --json out.json
    python benchmarks/vision.py --smoke         # a tiny tower and body: checks the plumbing in under a minute

Checkpoint (random, seeded, built once with transformers' save_pretrained under
benchmarks/.cache/vision/, float32, 3.2 GB): the released vision configuration
(hidden 1152, intermediate 4304, 27 layers, 16 heads x 72, patch 16, pooling 3,
standardize, 10240 position embeddings; 570M parameters) with a text body of
the released width (hidden 2816, so the embedder is the released 1152 -> 2816
projection) but 2 layers, 4 experts and a 16384-word vocabulary. Our
converter's output (`python -m mlx_diffusiongemma.convert`, not quantized)
and `save_model` of our loaded model are written next to it. float32: mlx's
CPU matrix products in bfloat16 are ~30x slower than float32 with OpenBLAS.

Image: a seeded 1344x1920 RGB PNG (no alpha: mlx-vlm composites RGBA on black,
the reference on white), resized by both to 672x960: exactly 280 soft tokens,
2520 patches, no padding. Prompt: the chat template with the image before the
text "why is the sky blue", the image token expanded to boi + 280 soft tokens
+ eoi (293 tokens).

Ours and mlx-vlm run in processes of their own (peak memory of their own) on
the converted repo, at the same time but taking turns phase by phase (one
computes while the other waits), so that both see the machine's background load
alike (--sequential: one after the other). Same environment: on Linux Debian's
OpenBLAS is preloaded when installed, as speed.py does.
- ours: `load`; active memory after it (the tower is attached lazily); a short
  text-only `diffusion_generate` and the active memory after it; prompt
  rendering + preprocessing (`prepare_prompts`, what diffusion_generate runs);
  the tower (`Model.embed_images`, evaluated) then the prefill
  (`generate.prefill` with the features, evaluated): a first run (it reads the
  tower's weights from the file) then --repeats runs; the first decoder logits
  on a fixed canvas; `diffusion_generate(..., images=[path])`.
- mlx-vlm: `mlx_vlm.load`; its processor (chat template + image); tower and
  prefill as its engine runs them, one `diffusion_prefill_cache` call with
  `pixel_values` and `mm_token_type_ids`, the tower's share stamped by a
  wrapper around `encoder.get_image_features` that evaluates its output; the
  same runs; the first decoder logits on the same canvas; `mlx_vlm.generate`
  with the image (round trip of the converted repo; its features captured).
- then mlx-vlm alone on the `save_model` repo (round trip): load, and
  `mlx_vlm.generate` with the image, same seed: the same text and the same
  image features as on the converted repo are required.
The generate checks use --check-soft-tokens (default 70: 630 patches, well
under a third of a 280-token tower pass) and 8 tokens, 4 denoising steps.

Time: six 280-token tower passes (3 per implementation) and three 70-token
ones dominate. Each 280-token pass is ~100 s of CPU time on a 2-core VM, so
the default run should take about 8-10 minutes there when the machine is
quiet (an estimate: the recorded runs shared the machine with other jobs, a
load average of 4-10, and took 21-29 minutes).

Encoding = tower + prefill of the prompt with its soft tokens: median of
--repeats runs after the first (warm-up) run, in wall-clock time and in the
process's CPU time (all its threads; less sensitive to other jobs on the
machine than wall-clock time, though not immune: shared caches, memory
bandwidth). Memory: mlx's active memory at
the points named, mlx's peak over the timed runs alone (reset after the
warm-up), mlx's peak of the process up to there, and the process's max RSS
(to the end of the timed runs). Ratios: peer / ours (> 1: ours is faster, or
smaller). CPU figures: ratios, not absolute claims. Also compared, from the
same prompt: token ids, pixel patches, image features, first logits.

mlx-vlm is installed with pip --no-deps into benchmarks/.peers/site (speed.py's
setup_mlx_vlm), never into this environment. transformers and torch (the test
extra) build the checkpoint. Exits 1 if a worker fails or the round trip does
not give the same text and features from both repos.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "vision"

PROMPT = "why is the sky blue"
IMAGE_SIZE = (1344, 1920)  # height, width: resized to 672 x 960 = 42 x 60 patches = 14 x 20 soft tokens
SMOKE_IMAGE_SIZE = (672, 960)  # no resize
GENERATE = dict(max_tokens=8, max_denoising_steps=4)  # the API checks: one canvas, 4 steps

REAL_VISION = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    num_key_value_heads=16, head_dim=72, patch_size=16, pooling_kernel_size=3,
    position_embedding_size=10240, standardize=True,
)
BODY_TEXT = dict(
    vocab_size=16384, hidden_size=2816, intermediate_size=2112, num_hidden_layers=2,
    layer_types=["sliding_attention", "full_attention"], num_attention_heads=16, num_key_value_heads=8,
    head_dim=256, global_head_dim=512, num_global_key_value_heads=2, num_experts=4, top_k_experts=2,
    moe_intermediate_size=704, sliding_window=1024, max_position_embeddings=32768, rms_norm_eps=1e-6,
    final_logit_softcapping=30.0, use_bidirectional_attention="vision",
)
SMOKE_VISION = dict(REAL_VISION, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, head_dim=32)
SMOKE_TEXT = dict(BODY_TEXT, vocab_size=1024, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, global_head_dim=64, num_global_key_value_heads=1,
                  moe_intermediate_size=64)
CANVAS_LENGTH = 256


def _module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ================================================================ workers (each in its own process)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def gb(n) -> float:
    return n / 1e9


def median(samples):
    return statistics.median(samples) if samples else None


def log(spec, message):
    print(f"  [{spec['kind']}] {message}", file=sys.stderr, flush=True)


class Turns:
    """Turn-taking with the driver (ours and mlx-vlm run side by side,
    alternating phase by phase, so that both see the same background load):
    each phase starts when the driver says "go" and ends with "done". The
    protocol runs on the worker's original stdout; print() goes to stderr."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        if enabled:
            self.out = os.fdopen(os.dup(1), "w")
            os.dup2(2, 1)
            sys.stdout = sys.stderr

    def __enter__(self):
        if self.enabled:
            self.out.write("ready\n")
            self.out.flush()
            if sys.stdin.readline().strip() != "go":
                raise SystemExit("the driver went away")
        return self

    def __exit__(self, *_):
        if self.enabled:
            self.out.write("done\n")
            self.out.flush()


def write_image(path: Path, height: int, width: int, seed: int) -> None:
    """A smooth seeded RGB picture with some noise (8-bit, no alpha)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = []
    for c in range(3):
        fx, fy, phase = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (fx * x / width + fy * y / height) + phase)
        blob = np.exp(-(((x - rng.uniform(0, width)) / width) ** 2 + ((y - rng.uniform(0, height)) / height) ** 2) * 8)
        channels.append(0.5 + 0.3 * wave + 0.2 * blob)
    pixels = np.stack(channels, -1) + rng.normal(0, 0.04, (height, width, 3))
    Image.fromarray(np.clip(np.round(pixels * 255), 0, 255).astype(np.uint8), "RGB").save(path)


def build(spec, results):
    """The random reference checkpoint, saved with save_pretrained (float32),
    in the global_head_dim config form mlx-vlm reads, with a word-level
    tokenizer that names its image tokens (mlx-vlm's processor reads
    tokenizer.image_token / boi_token / eoi_token) and a processor config."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig
    from transformers.models.gemma4 import Gemma4VisionConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.reference import save_reference
    from helpers.tiny_tokenizer import image_token_ids, write_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    final = Path(spec["checkpoint"])
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    torch.manual_seed(spec["seed"])
    text = DiffusionGemmaTextConfig(**spec["text"])
    ids = image_token_ids(text.vocab_size)
    config = DiffusionGemmaConfig(
        text_config=text, vision_config=Gemma4VisionConfig(**spec["vision"]), canvas_length=CANVAS_LENGTH, **ids,
    )
    start = time.perf_counter()
    model = DiffusionGemmaForBlockDiffusion(config).eval().float()
    # perturb every parameter and buffer away from its initial value, as tests/helpers/reference.py
    # does, so that a port ignoring one (a norm, std_bias / std_scale, a layer scalar) differs
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.add_(0.3)  # attention scale 1: keeps attention logits O(1)
            elif name.endswith(("norm.weight", ".scale", "per_expert_scale", "std_scale")):
                p.add_(1.0)
        for name, p in model.named_parameters():
            if name.startswith("model.encoder.language_model.") and name.endswith(".bias"):
                p.copy_(model.get_parameter(name.replace("encoder.language_model.", "decoder.")))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.6 + torch.rand(b.shape, generator=gen))
    results["parameters"] = sum(p.numel() for p in model.parameters())
    results["vision_parameters"] = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision."))
    )
    save_reference(model, staging, global_head_dim_form=True)
    del model
    sampler = speed_workers().reference_generation_config(48)
    (staging / "generation_config.json").write_text(json.dumps(sampler, indent=2))
    write_tokenizer(staging, vocab_size=text.vocab_size)
    tokenizer_config = staging / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    settings["extra_special_tokens"] = {"boi_token": "<|image>", "image_token": "<|image|>", "eoi_token": "<image|>"}
    tokenizer_config.write_text(json.dumps(settings, indent=2))
    processor = {
        "processor_class": "Gemma4Processor",
        "image_seq_length": 280,
        "image_processor": {
            "image_processor_type": "Gemma4ImageProcessor", "do_convert_rgb": True, "do_normalize": False,
            "do_rescale": True, "do_resize": True, "rescale_factor": 1 / 255, "resample": 3,
            "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0],
            "max_soft_tokens": 280, "patch_size": spec["vision"]["patch_size"],
            "pooling_kernel_size": spec["vision"]["pooling_kernel_size"],
        },
    }
    (staging / "processor_config.json").write_text(json.dumps(processor, indent=2))
    staging.rename(final)
    results["build_s"] = time.perf_counter() - start


def speed_workers():
    return _module("_speed_workers_for_vision", HERE / "speed_workers.py")


def save(spec, results):
    """Our `load` + `save_model` (and the companion files), from the HF checkpoint."""
    from mlx_diffusiongemma import load
    from mlx_diffusiongemma.load import copy_companions, load_config, save_model

    source, target = Path(spec["source"]), Path(spec["checkpoint"])
    start = time.perf_counter()
    model, _ = load(source)
    save_model(model, target, load_config(source))
    results["copied"] = copy_companions(source, target)
    results["save_s"] = time.perf_counter() - start


def encode_runs(spec, results, turns, encode, mx):
    """The first encoding (warm-up; for ours it reads the tower's weights),
    then `repeats` timed ones, each a phase of its own; mlx's peak memory
    over the timed ones alone. Returns the last run's features and cache."""
    with turns:
        features, cache, (tower, fill), _ = encode()
        results["first_tower_s"], results["first_prefill_s"] = tower, fill
        results["active_after_image_gb"] = gb(mx.get_active_memory())
        results["peak_process_gb"] = gb(mx.get_peak_memory())
        log(spec, f"first image: tower {tower:.2f} s, prefill {fill:.2f} s; "
            f"active {results['active_after_image_gb']:.2f} GB")
        del features, cache
        mx.reset_peak_memory()
    towers, fills, cpu_towers, cpu_encodes = [], [], [], []
    for i in range(spec["repeats"]):
        with turns:
            features = cache = None  # the previous run's, freed before this one
            features, cache, (tower, fill), (cpu_tower, cpu_fill) = encode()
        towers.append(tower)
        fills.append(fill)
        cpu_towers.append(cpu_tower)
        cpu_encodes.append(cpu_tower + cpu_fill)
        log(spec, f"run {i + 1}: tower {tower:.2f} s, prefill {fill:.2f} s (CPU time {cpu_tower:.2f} s, {cpu_fill:.2f} s)")
    results["tower_s"], results["prefill_s"] = towers, fills
    results["encode_s"] = [a + b for a, b in zip(towers, fills)]
    results["tower_cpu_s"], results["encode_cpu_s"] = cpu_towers, cpu_encodes
    results["peak_encode_gb"] = gb(mx.get_peak_memory())
    results["peak_process_gb"] = max(results["peak_process_gb"], results["peak_encode_gb"])
    results["rss_gb"] = peak_rss_gb()
    return features, cache


def time_preprocessing(spec, results, prepare):
    samples = []
    for _ in range(1 + spec["repeats"]):
        t = time.perf_counter()
        prepared = prepare()
        samples.append(time.perf_counter() - t)
    results["preprocess_s"] = median(samples[1:])
    return prepared


def run_ours(spec, results):
    import mlx.core as mx

    from mlx_diffusiongemma import diffusion_generate, load
    from mlx_diffusiongemma.generate import prefill
    from mlx_diffusiongemma.generate.loop import generation_stream
    from mlx_diffusiongemma.generate.prompts import prepare_prompts

    turns = Turns(spec.get("turns", False))
    with turns:
        start = time.perf_counter()
        model, tokenizer = load(spec["checkpoint"])
        results["load_s"] = time.perf_counter() - start
        results["has_vision"] = bool(model.has_vision)
        results["active_after_load_gb"] = gb(mx.get_active_memory())
        results["rss_after_load_gb"] = peak_rss_gb()
        # a text-only user: the tower must stay unread
        response = diffusion_generate(model, tokenizer, PROMPT, seed=spec["seed"], **GENERATE)
        results["text_generate_tokens"] = len(response.tokens)
        results["active_after_text_gb"] = gb(mx.get_active_memory())
        log(spec, f"text only: active {results['active_after_text_gb']:.2f} GB after load and generate")

    with turns:  # the image's prompt: chat template, image token expanded, pixels
        prompt = time_preprocessing(spec, results, lambda: prepare_prompts(
            PROMPT, [spec["image"]], tokenizer, model, spec["max_soft_tokens"])[0])
    results["soft_tokens"] = prompt.counts
    results["prompt_tokens"] = int(prompt.ids.size)

    def encode():
        with mx.stream(generation_stream):  # as diffusion_generate runs it
            t0, c0 = time.perf_counter(), time.process_time()
            features = model.embed_images(prompt.pixel_values, prompt.position_ids)
            mx.eval(features)
            t1, c1 = time.perf_counter(), time.process_time()
            cache = prefill(model, [prompt.ids], [features])
            mx.eval([c.state for c in cache])
            t2, c2 = time.perf_counter(), time.process_time()
        return features, cache, (t1 - t0, t2 - t1), (c1 - c0, c2 - c1)

    features, cache = encode_runs(spec, results, turns, encode, mx)

    with turns:
        canvas = mx.array([spec["canvas"]], dtype=mx.int32)
        with mx.stream(generation_stream):
            logits = model.decode(canvas, cache)
            mx.eval(logits)
        np.savez(
            spec["arrays"], ids=np.array(prompt.ids), pixels=np.asarray(prompt.pixel_values),
            features=np.array(features.astype(mx.float32)), logits=np.array(logits[0].astype(mx.float32)),
        )
        del features, cache, logits
        # the public API with an image (at --check-soft-tokens)
        t = time.perf_counter()
        response = diffusion_generate(model, tokenizer, PROMPT, images=[spec["image"]],
                                      max_soft_tokens=spec["check_soft_tokens"], seed=spec["seed"], **GENERATE)
        results["image_generate_s"] = time.perf_counter() - t
        results["image_generate_text"] = response.text
        results["image_generate_prompt_tokens"] = response.prompt_tokens


def mlx_vlm_modules(spec):
    sys.path.insert(0, spec["peers_site"])
    import mlx_vlm
    from mlx_vlm.generate.common import generation_stream
    from mlx_vlm.prompt_utils import apply_chat_template

    return mlx_vlm, generation_stream, apply_chat_template


class Stamped:
    """Wraps encoder.get_image_features: evaluates the features (the same work
    the prefill would do inside its graph) and records how long they took and
    what they were."""

    def __init__(self, encoder, mx):
        self.encoder, self.mx, self.original = encoder, mx, encoder.get_image_features
        self.seconds, self.cpu_seconds, self.features = [], [], None

    def __call__(self, pixel_values):
        start, cpu = time.perf_counter(), time.process_time()
        features = self.original(pixel_values)
        self.mx.eval(features)
        self.seconds.append(time.perf_counter() - start)
        self.cpu_seconds.append(time.process_time() - cpu)
        self.features = features
        return features

    def __enter__(self):
        self.encoder.get_image_features = self
        return self

    def __exit__(self, *_):
        self.encoder.get_image_features = self.original


def run_mlx_vlm(spec, results):
    import mlx.core as mx
    from PIL import Image

    mlx_vlm, generation_stream, apply_chat_template = mlx_vlm_modules(spec)
    results["version"] = mlx_vlm.__version__
    turns = Turns(spec.get("turns", False))
    with turns:
        start = time.perf_counter()
        model, processor = mlx_vlm.load(spec["checkpoint"])
        results["load_s"] = time.perf_counter() - start
        results["has_vision"] = model.model.encoder.vision_tower is not None
        results["active_after_load_gb"] = gb(mx.get_active_memory())
        results["rss_after_load_gb"] = peak_rss_gb()
    encoder = model.model.encoder

    def prepare():
        formatted = apply_chat_template(processor, model.config, PROMPT, num_images=1)
        with Image.open(spec["image"]) as image:
            return processor(text=[formatted], images=[image.convert("RGB")], return_tensors="mlx", padding=True)

    with turns:
        processor.image_processor.max_soft_tokens = spec["max_soft_tokens"]
        inputs = time_preprocessing(spec, results, prepare)
    ids = mx.array(inputs["input_ids"])
    pixel_values = mx.array(inputs["pixel_values"])
    token_types = inputs.get("mm_token_type_ids")
    token_types = None if token_types is None else mx.array(token_types)
    results["prompt_tokens"] = int(ids.shape[1])

    def encode():
        with Stamped(encoder, mx) as stamp, mx.stream(generation_stream):  # one prefill call, as its engine runs it
            t0, c0 = time.perf_counter(), time.process_time()
            cache = model.diffusion_prefill_cache(
                ids, attention_mask=None, cache=model.make_cache(), pixel_values=pixel_values,
                mm_token_type_ids=token_types, prefill_step_size=2048, chunk_prefill=False,
            )
            mx.eval([c.state for c in cache])
            total, cpu_total = time.perf_counter() - t0, time.process_time() - c0
        (tower,), (cpu_tower,) = stamp.seconds, stamp.cpu_seconds
        return stamp.features, cache, (tower, total - tower), (cpu_tower, cpu_total - cpu_tower)

    features, cache = encode_runs(spec, results, turns, encode, mx)

    with turns:
        canvas = mx.array([spec["canvas"]], dtype=mx.int32)
        with mx.stream(generation_stream):
            masks = model.diffusion_decoder_masks(canvas, cache, None)
            logits = model.diffusion_decoder_logits(canvas, cache=cache, self_conditioning=None,
                                                    decoder_attention_mask=masks)
            mx.eval(logits)
        p = np.array(pixel_values.astype(mx.float32))  # [1, 3, H, W] -> [1, n, p*p*3] in (row, column, channel)
        k = spec["patch_size"]
        _, c, h, w = p.shape
        patches = p.reshape(1, c, h // k, k, w // k, k).transpose(0, 2, 4, 3, 5, 1).reshape(1, (h // k) * (w // k), -1)
        np.savez(
            spec["arrays"], ids=np.array(ids[0]), pixels=patches,
            features=np.array(features.reshape(-1, features.shape[-1]).astype(mx.float32)),
            logits=np.array(logits[0].astype(mx.float32)),
        )
        del features, cache, logits
        roundtrip(spec, results, mlx_vlm, apply_chat_template, model, processor, mx, spec["generate_arrays"])


def roundtrip(spec, results, mlx_vlm, apply_chat_template, model, processor, mx, arrays):
    """mlx_vlm.generate with the image (at --check-soft-tokens): no error, its
    text, and the image features it used (captured)."""
    processor.image_processor.max_soft_tokens = spec["check_soft_tokens"]
    formatted = apply_chat_template(processor, model.config, PROMPT, num_images=1)
    t = time.perf_counter()
    with Stamped(model.model.encoder, mx) as stamp:
        mx.random.seed(spec["seed"])
        result = mlx_vlm.generate(model, processor, formatted, image=[spec["image"]], verbose=False,
                                  temperature=1.0, **GENERATE)
    results["image_generate_s"] = time.perf_counter() - t
    results["image_generate_text"] = result.text
    results["image_generate_tokens"] = result.generation_tokens
    results["image_generate_prompt_tokens"] = result.prompt_tokens
    if stamp.features is None:
        raise RuntimeError("mlx_vlm.generate with the image never called the vision tower")
    np.savez(arrays, features=np.array(stamp.features.reshape(-1, stamp.features.shape[-1]).astype(mx.float32)))


def run_mlx_vlm_roundtrip(spec, results):
    import mlx.core as mx

    mlx_vlm, _, apply_chat_template = mlx_vlm_modules(spec)
    results["version"] = mlx_vlm.__version__
    model, processor = mlx_vlm.load(spec["checkpoint"])
    results["has_vision"] = model.model.encoder.vision_tower is not None
    roundtrip(spec, results, mlx_vlm, apply_chat_template, model, processor, mx, spec["generate_arrays"])


WORKERS = {"build": build, "save": save, "ours": run_ours, "mlx-vlm": run_mlx_vlm,
           "mlx-vlm-roundtrip": run_mlx_vlm_roundtrip}


def worker_main(kind, spec_path, out_path):
    spec = json.loads(Path(spec_path).read_text())
    spec["kind"] = kind
    results = {}
    start = time.perf_counter()
    try:
        WORKERS[kind](spec, results)
    except Exception as e:  # noqa: BLE001 - the driver reports it
        results["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:800]
        traceback.print_exc(file=sys.stderr)
    results["wall_s"] = time.perf_counter() - start
    Path(out_path).write_text(json.dumps(results, indent=1))


# ================================================================ driver


def worker(kind, spec, env, python):
    return side_by_side([(kind, spec)], env, python)[0]


def side_by_side(jobs, env, python):
    """Run the workers [(kind, spec)]; with spec["turns"], all at once but
    taking turns phase by phase (round robin: one computes, the others wait),
    so that each sees the machine's background load alike. Their results."""
    with tempfile.TemporaryDirectory() as tmp:
        procs, outs = [], []
        for i, (kind, spec) in enumerate(jobs):
            spec_path, out_path = Path(tmp, f"spec{i}.json"), Path(tmp, f"out{i}.json")
            spec_path.write_text(json.dumps(spec))
            turns = spec.get("turns", False)
            pipe = subprocess.PIPE if turns else None
            procs.append(subprocess.Popen(
                [python, str(Path(__file__).resolve()), "--worker", kind, str(spec_path), str(out_path)],
                env=env, cwd=ROOT, stdin=pipe, stdout=pipe, text=True,
            ))
            outs.append(out_path)
        active = [p for p, (_, spec) in zip(procs, jobs) if spec.get("turns", False)]
        while active:
            for proc in list(active):
                if proc.stdout.readline().strip() != "ready":  # it has finished (or failed)
                    active.remove(proc)
                    continue
                proc.stdin.write("go\n")
                proc.stdin.flush()
                if proc.stdout.readline().strip() != "done":
                    active.remove(proc)
        results = []
        for proc, out_path in zip(procs, outs):
            if proc.stdin:
                proc.stdin.close()
            code = proc.wait()
            results.append(json.loads(out_path.read_text()) if out_path.exists()
                           else {"error": f"worker exited with status {code} and no result"})
        return results


def checkpoints(args, env, python):
    """hf/ (built), converted/ (our convert), saved/ (our save_model), image.png."""
    vision, text = (SMOKE_VISION, SMOKE_TEXT) if args.smoke else (REAL_VISION, BODY_TEXT)
    key = json.dumps(dict(vision=vision, text=text, seed=args.seed, canvas=CANVAS_LENGTH), sort_keys=True)
    base = CACHE / f"{'smoke' if args.smoke else 'real-vision'}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    base.mkdir(parents=True, exist_ok=True)
    paths = dict(base=base, hf=base / "hf", converted=base / "converted", saved=base / "saved", image=base / "image.png")
    steps = {}
    if not paths["image"].exists():
        write_image(paths["image"], *(SMOKE_IMAGE_SIZE if args.smoke else IMAGE_SIZE), seed=args.seed)
    if not paths["hf"].exists():
        print(f"building the random checkpoint in {paths['hf'].relative_to(ROOT)} (transformers save_pretrained) ...", flush=True)
        result = worker("build", dict(checkpoint=str(paths["hf"]), vision=vision, text=text, seed=args.seed), env, python)
        if "error" in result:
            raise SystemExit(f"building the checkpoint failed: {result['error']}")
        steps["build"] = result
    if not paths["converted"].exists():
        print("converting it: python -m mlx_diffusiongemma.convert ...", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([python, "-m", "mlx_diffusiongemma.convert", "--hf-path", str(paths["hf"]),
                               "--mlx-path", str(paths["converted"])], env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"python -m mlx_diffusiongemma.convert failed with status {proc.returncode}")
        steps["convert_s"] = time.perf_counter() - start
    if not paths["saved"].exists():
        print("writing it again with load + save_model ...", flush=True)
        result = worker("save", dict(source=str(paths["hf"]), checkpoint=str(paths["saved"])), env, python)
        if "error" in result:
            raise SystemExit(f"load + save_model failed: {result['error']}")
        steps["save"] = result
    return paths, steps, vision, text


def size_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9


def compare(ours_file, peer_file):
    """What matches between our arrays and mlx-vlm's."""
    if not (Path(ours_file).exists() and Path(peer_file).exists()):
        return None
    a, b = np.load(ours_file), np.load(peer_file)
    out = {}
    out["ids_equal"] = a["ids"].shape == b["ids"].shape and bool((a["ids"] == b["ids"]).all())
    out["ids_lengths"] = (int(a["ids"].size), int(b["ids"].size))
    if a["pixels"].shape == b["pixels"].shape:
        out["pixels_max_abs"] = float(np.abs(a["pixels"] - b["pixels"]).max())
    else:
        out["pixels_shapes"] = (a["pixels"].shape, b["pixels"].shape)
    fa, fb = a["features"].astype(np.float64), b["features"].astype(np.float64)
    if fa.shape == fb.shape:
        out.update(features_compare(fa, fb))
    else:
        out["features_shapes"] = (fa.shape, fb.shape)
    la, lb = a["logits"].astype(np.float64), b["logits"].astype(np.float64)
    if la.shape == lb.shape:
        out["logits_max_abs"] = float(np.abs(la - lb).max())
        out["logits_scale"] = float(np.abs(la).max())
        out["argmax_agree"] = float((la.argmax(-1) == lb.argmax(-1)).mean())
    else:
        out["logits_shapes"] = (la.shape, lb.shape)
    return out


def features_compare(fa, fb):
    cos = (fa * fb).sum(-1) / (np.linalg.norm(fa, axis=-1) * np.linalg.norm(fb, axis=-1) + 1e-30)
    return dict(features_shape=fa.shape, features_max_abs=float(np.abs(fa - fb).max()),
                features_scale=float(np.abs(fa).max()), features_min_cosine=float(cos.min()))


def fmt_s(x):
    return "-" if x is None else (f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.2f} s")


def fmt_gb(x):
    return "-" if x is None else f"{x:.2f} GB"


def ratio(ours, peer):
    return "-" if not ours or not peer else f"{peer / ours:.2f}x"


ROWS = [  # label, key, kind ("time" from samples, "time1" single, "mem")
    ("prompt + image preprocessing", "preprocess_s", "time1"),
    ("vision tower (280 soft tokens)", "tower_s", "time"),
    ("prefill with the soft tokens", "prefill_s", "time"),
    ("encoding: tower + prefill", "encode_s", "time"),
    ("vision tower, process CPU time", "tower_cpu_s", "time"),
    ("encoding, process CPU time", "encode_cpu_s", "time"),
    ("first image: tower", "first_tower_s", "time1"),
    ("active memory after load", "active_after_load_gb", "mem"),
    ("active memory after text-only generate", "active_after_text_gb", "mem"),
    ("active memory after the first image", "active_after_image_gb", "mem"),
    ("peak mlx, encoding runs", "peak_encode_gb", "mem"),
    ("peak mlx, process (load + first image)", "peak_process_gb", "mem"),
    ("max RSS, process (to end of encoding)", "rss_gb", "mem"),
]


def value(result, key, kind):
    v = result.get(key)
    if kind == "time":
        return median(v) if isinstance(v, list) else None
    return v


def table(ours, peer, markdown=False):
    lines = []
    if markdown:
        lines += ["| measure | ours | mlx-vlm 0.7.10 | ours vs mlx-vlm |", "|---|---|---|---|"]
    else:
        lines += [f"{'measure':<42}{'ours':>12}{'mlx-vlm':>12}{'vs mlx-vlm':>12}", "-" * 78]
    for label, key, kind in ROWS:
        a, b = value(ours, key, kind), value(peer, key, kind)
        if a is None and b is None:
            continue
        f = fmt_gb if kind == "mem" else fmt_s
        r = ratio(a, b) if key not in ("active_after_text_gb",) else "-"
        if markdown:
            lines.append(f"| {label} | {f(a)} | {f(b)} | {r} |")
        else:
            lines.append(f"{label:<42}{f(a):>12}{f(b):>12}{r:>12}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                     epilog="See the module docstring for what each side runs.")
    parser.add_argument("--repeats", type=int, default=2, help="timed encodings after the first one (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-soft-tokens", type=int, default=280, choices=[70, 140, 280, 560, 1120])
    parser.add_argument("--check-soft-tokens", type=int, default=70, choices=[70, 140, 280, 560, 1120],
                        help="soft tokens of the image in the generate checks (default 70: a quarter of the tower's cost)")
    parser.add_argument("--sequential", action="store_true",
                        help="run ours, then mlx-vlm (default: both at once, taking turns phase by phase)")
    parser.add_argument("--smoke", action="store_true", help="a tiny tower and body (plumbing check, ~1 minute)")
    parser.add_argument("--no-openblas", action="store_true", help="do not preload OpenBLAS")
    parser.add_argument("--skip-mlx-vlm", action="store_true", help="ours only")
    parser.add_argument("--json", type=Path, default=None, help="where the JSON goes (default: in the cache folder)")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(*args.worker)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    start = time.perf_counter()
    speed = _module("_speed_for_vision", HERE / "speed.py")
    python = sys.executable
    env, blas = speed.environment(args)
    print(f"python {python}; {blas}; repeats {args.repeats} after a first (warm-up) run")
    unavailable = None
    if not args.skip_mlx_vlm:
        unavailable = speed.setup_mlx_vlm(python)
        if unavailable:
            print(f"mlx-vlm: not run: {unavailable}")
    paths, steps, vision, text = checkpoints(args, env, python)
    rng = np.random.default_rng(args.seed)
    canvas = rng.integers(3, text["vocab_size"] - 3, CANVAS_LENGTH).tolist()  # below the image tokens
    common = dict(seed=args.seed, repeats=args.repeats, max_soft_tokens=args.max_soft_tokens, image=str(paths["image"]),
                  check_soft_tokens=args.check_soft_tokens,
                  canvas=canvas, patch_size=vision["patch_size"], peers_site=str(speed.PEERS_SITE))
    base = paths["base"]
    for stale in base.glob("*.npz"):  # arrays of an earlier run must not be compared
        stale.unlink()
    common.update(turns=not args.sequential)
    jobs = [("ours", dict(common, checkpoint=str(paths["converted"]), arrays=str(base / "ours.npz")))]
    if not args.skip_mlx_vlm and not unavailable:
        jobs.append(("mlx-vlm", dict(common, checkpoint=str(paths["converted"]), arrays=str(base / "mlx_vlm.npz"),
                                     generate_arrays=str(base / "mlx_vlm_generate.npz"))))
    results = {}
    if args.sequential:
        for kind, spec in jobs:
            print(f"\n[{kind}] ...", flush=True)
            results[kind] = worker(kind, spec, env, python)
    else:
        print(f"\n[{' and '.join(kind for kind, _ in jobs)}, taking turns] ...", flush=True)
        results.update(zip([kind for kind, _ in jobs], side_by_side(jobs, env, python)))
    if "mlx-vlm" in results:
        print("\n[mlx-vlm, save_model repo] ...", flush=True)
        results["mlx-vlm-saved"] = worker("mlx-vlm-roundtrip", dict(
            common, turns=False, checkpoint=str(paths["saved"]), generate_arrays=str(base / "mlx_vlm_saved.npz")), env, python)

    ours, peer, saved = results["ours"], results.get("mlx-vlm", {}), results.get("mlx-vlm-saved", {})
    failures = []
    print(f"\n== images: the released vision tower (hidden {vision['hidden_size']}, {vision['num_hidden_layers']} layers, "
          f"{vision['num_attention_heads']} heads x {vision['head_dim']}, patch {vision['patch_size']}, pooling "
          f"{vision['pooling_kernel_size']}) on a text body of hidden {text['hidden_size']}, {text['num_hidden_layers']} "
          f"layers, {text['num_experts']} experts, vocab {text['vocab_size']}; float32; "
          f"{args.max_soft_tokens} soft tokens, prompt {ours.get('prompt_tokens', '?')} tokens")
    print(f"checkpoint {paths['hf'].relative_to(ROOT)}: {size_gb(paths['hf']):.2f} GB; converted "
          f"{size_gb(paths['converted']):.2f} GB; saved {size_gb(paths['saved']):.2f} GB")
    print(table(ours, peer))
    for name, r in results.items():
        if r.get("error"):
            print(f"  {name}: FAILED: {r['error']}")
            failures.append(name)

    comparison = compare(base / "ours.npz", base / "mlx_vlm.npz") if peer and not peer.get("error") else None
    saved_features = None
    if saved and not saved.get("error") and (base / "mlx_vlm_saved.npz").exists() and (base / "mlx_vlm_generate.npz").exists():
        saved_features = features_compare(np.load(base / "mlx_vlm_generate.npz")["features"].astype(np.float64),
                                          np.load(base / "mlx_vlm_saved.npz")["features"].astype(np.float64))
    print(f"\nround trip (mlx-vlm 0.7.10 on repos we write; generate with the image at {args.check_soft_tokens} soft tokens):")
    for label, r in (("converted (python -m mlx_diffusiongemma.convert)", peer), ("save_model of a loaded model", saved)):
        if not r:
            continue
        status = "FAILED: " + r["error"] if r.get("error") else (
            f"loads (vision tower: {r.get('has_vision')}), generates with the image: "
            f"{r.get('image_generate_tokens')} tokens, {r.get('image_generate_prompt_tokens')} prompt tokens, "
            f"text {r.get('image_generate_text', '')!r}")
        print(f"  {label}: {status}")
    if saved and peer and not saved.get("error") and not peer.get("error"):
        same = saved.get("image_generate_text") == peer.get("image_generate_text")
        print(f"  same seed, both repos: same text: {same}")
        if not same:
            failures.append("round trip: the save_model repo generates another text than the converted repo")
        if saved_features:
            print(f"  image features, save_model repo vs converted repo: max |diff| {saved_features['features_max_abs']:.3g}")
            if saved_features["features_max_abs"] != 0:
                failures.append("round trip: the save_model repo's image features differ from the converted repo's")
    if comparison:
        c = comparison
        print("\nours vs mlx-vlm on the converted repo (float32):")
        print(f"  prompt ids equal: {c['ids_equal']} (lengths {c['ids_lengths'][0]} / {c['ids_lengths'][1]})")
        if "pixels_max_abs" in c:
            print(f"  pixel patches: max |diff| {c['pixels_max_abs']:.3g}")
        else:
            print(f"  pixel patches: shapes differ {c['pixels_shapes']}")
        if "features_max_abs" in c:
            print(f"  image features {tuple(c['features_shape'])}: max |diff| {c['features_max_abs']:.3g} "
                  f"(max |value| {c['features_scale']:.3g}), min cosine {c['features_min_cosine']:.7f}")
        else:
            print(f"  image features: shapes differ {c['features_shapes']}")
        if "logits_max_abs" in c:
            print(f"  first decoder logits on the same canvas: max |diff| {c['logits_max_abs']:.3g} "
                  f"(max |value| {c['logits_scale']:.3g}), argmax agreement {c['argmax_agree']:.2%}")
    if ours and not ours.get("error"):
        print(f"\nours: text-only use holds {ours['active_after_text_gb']:.2f} GB (after load "
              f"{ours['active_after_load_gb']:.2f} GB); the first image adds the tower: "
              f"{ours['active_after_image_gb']:.2f} GB; diffusion_generate with the image ({args.check_soft_tokens} "
              f"soft tokens, {ours.get('image_generate_prompt_tokens')} prompt tokens): {ours.get('image_generate_text', '')!r}")
    print(f"\nmarkdown:\n\n{table(ours, peer, markdown=True)}")

    total = time.perf_counter() - start
    out = args.json or base / "results.json"
    out.write_text(json.dumps(dict(settings=dict(blas=blas, repeats=args.repeats, seed=args.seed, smoke=args.smoke,
                                                 max_soft_tokens=args.max_soft_tokens, total_s=total),
                                   steps=steps, results=results, comparison=comparison,
                                   saved_features=saved_features), indent=1, default=str))
    print(f"\nJSON: {out}\ntotal {total:.0f} s")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
