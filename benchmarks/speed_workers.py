"""Workers for benchmarks/speed.py: each implementation runs in a process of its
own (separate imports, separate peak memory) and writes its measures as JSON.

    python benchmarks/speed_workers.py {ours,mlx-vlm,transformers,build,probe} SPEC.json OUT.json

speed.py writes SPEC.json (checkpoint, prompt and canvas ids, steps, repeats)
and reads OUT.json; run it rather than this file. Times are seconds; each
measure keeps its samples (`repeats` of them, after `warmup` untimed runs) and
their median, with evaluation forced (mx.eval; torch is eager) inside the timed
region. Prefill, canvas and full step come from the same runs of each
implementation's own generation loop (one canvas, `steps` steps, adaptive
stopping off, no eos); commit, decoder and self-conditioning are timed alone on
a cache holding the prompt.

What each implementation runs:
- ours: mlx_diffusiongemma's public functions: `load_model`, `Model.encode`,
  `Model.decode`, `stream_diffusion_generate` (the default reference sampler).
- mlx-vlm 0.7.10: `mlx_vlm.load`, the model's `diffusion_prefill_cache`,
  `diffusion_update_cache`, `diffusion_decoder_masks`, `diffusion_decoder_logits`,
  `diffusion_self_conditioning`, and the engine `mlx_vlm.generate.diffusion.
  stream_diffusion_generate` with `diffusion_sampler="entropy-bound"`,
  `temperature=1.0`, `diffusion_full_canvas=True` (the reference algorithm).
- transformers: `DiffusionGemmaForBlockDiffusion` (encoder, forward) and its
  `generate` / `_denoising_step` from generation_diffusion_gemma.py.
"""

import copy
import ctypes
import json
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

TEMPERATURE = 0.8  # the schedule's t_max: the processed logits of a first step
NEVER_STOP = 1e-30  # confidence_threshold: adaptive stopping never triggers


# ---------------------------------------------------------------- helpers


def log(spec, message):
    print(f"  [{spec['impl']} {spec['config']}] {message}", file=sys.stderr, flush=True)


def repeat(spec, fn, setup=None):
    """Seconds per call of fn(setup()) (setup untimed), after the warm-up calls."""
    samples = []
    for i in range(spec["warmup"] + spec["repeats"]):
        arg = setup() if setup is not None else None
        start = time.perf_counter()
        fn(arg)
        elapsed = time.perf_counter() - start
        if i >= spec["warmup"]:
            samples.append(elapsed)
    return samples


class Results(dict):
    """measure name -> {"median", "samples"} or {"error"}; extra keys as given."""

    def __init__(self, spec):
        super().__init__(measures={}, notes=[])
        self.spec = spec

    def measure(self, name, run):
        """Store run()'s samples (a list of seconds) under name; an exception is
        recorded as that measure's error, so the other measures still run."""
        try:
            samples = run()
            if not samples:
                raise RuntimeError("no samples")
            self["measures"][name] = {"median": statistics.median(samples), "samples": samples}
            log(self.spec, f"{name}: {statistics.median(samples) * 1e3:.1f} ms (median of {len(samples)})")
        except Exception as e:  # noqa: BLE001 - reported, never hidden
            self["measures"][name] = {"error": f"{type(e).__name__}: {e}".strip()[:400]}
            log(self.spec, f"{name}: ERROR {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stderr)
        return self["measures"][name].get("median")

    def measure_runs(self, runs):
        """runs() -> {"canvas": [...], "step": [...], "prefill": [...]}: the
        measures taken inside the real generation loop, from the same runs."""
        out = {}

        def canvas():
            out.update(runs())
            return out["canvas"]

        self.measure("canvas", canvas)
        for name in ("step", "prefill"):
            self.measure(name, lambda name=name: out[name] if name in out else _raise("the generation runs failed"))

    def note(self, text):
        self["notes"].append(text)


def _raise(message):
    raise RuntimeError(message)


def _maps():
    path = Path("/proc/self/maps")
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = line.split()
        if len(parts) >= 6 and "/" in parts[-1]:
            low, high = (int(x, 16) for x in parts[0].split("-"))
            rows.append((low, high, parts[-1]))
    return rows


def resolved(symbol):
    """The library a global lookup of `symbol` finds (a preloaded library comes
    first), or None when it is in no globally visible library."""
    try:
        address = ctypes.cast(getattr(ctypes.CDLL(None), symbol), ctypes.c_void_p).value
    except AttributeError:
        return None
    return next((p for low, high, p in _maps() if low <= address < high), "?")


def mlx_blas(mx) -> str:
    """Which library mlx's matrix products call (after a matmul): the one
    cblas_sgemm resolves to globally (a preloaded OpenBLAS), else the BLAS
    mlx's wheel links (on Linux a reference BLAS it bundles)."""
    if mx.default_device() == mx.gpu:
        return "GPU (matrix products do not use a CPU BLAS)"
    if sys.platform == "darwin":
        return "Accelerate"
    library = resolved("cblas_sgemm")
    if library:
        return f"{'OpenBLAS' if 'openblas' in library else 'BLAS'} (cblas_sgemm -> {library})"
    bundled = sorted({p for _, _, p in _maps() if "mlx" in p and "blas" in os.path.basename(p)})
    return f"mlx's bundled reference BLAS ({', '.join(bundled) or '?'}); no OpenBLAS preloaded"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def intervals(stamps):
    """Durations between consecutive time stamps."""
    return [later - earlier for earlier, later in zip(stamps, stamps[1:])]


def mlx_common(spec, results, mx):
    """mx.exp floor, BLAS in use and the device, for both MLX workers."""
    C, V = spec["canvas_length"], spec["vocab_size"]
    a = mx.random.normal((256, 256))
    mx.eval(a @ a)
    results["blas"] = mlx_blas(mx)
    results["device"] = str(mx.default_device())
    x = mx.random.normal((1, C, V))
    mx.eval(x)
    results.measure("exp", lambda: repeat(spec, lambda _: mx.eval(mx.exp(x))))
    del x


def mlx_memory(results, mx):
    results["peak_mlx_gb"] = mx.get_peak_memory() / 1e9
    results["peak_rss_gb"] = peak_rss_gb()


def measure_loop(results, mx, generation_runs):
    """The generation runs, mlx's peak memory counted over them alone (every
    mlx worker frees its isolated measures' arrays before; mlx_memory reads it)."""
    mx.reset_peak_memory()
    results.measure_runs(generation_runs)


def reference_generation_config(steps):
    """generation_config.json's sampler fields as the checkpoints carry them."""
    return {
        "max_denoising_steps": steps,
        "t_min": 0.4,
        "t_max": 0.8,
        "stability_threshold": 1,
        "confidence_threshold": 0.005,
        "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
    }


# ---------------------------------------------------------------- ours


def run_ours(spec, results):
    import mlx.core as mx

    import mlx_diffusiongemma
    from mlx_diffusiongemma import load_model, stream_diffusion_generate
    from mlx_diffusiongemma.generate import DiffusionOptions, loop
    from mlx_diffusiongemma.sampling import Randomness, next_self_conditioning, predict

    results["module"] = os.path.dirname(mlx_diffusiongemma.__file__)
    mlx_common(spec, results, mx)
    model = random_ours(spec, mx) if spec.get("random_init") else load_model(spec["checkpoint"])
    results["dtype"] = str(model.dtype)
    C, P, N = spec["canvas_length"], len(spec["prompt"]), spec["steps"]
    prompt = mx.array(spec["prompt"], dtype=mx.int32)
    canvas = mx.array(spec["canvas"], dtype=mx.int32)[None]
    chunk = loop.PREFILL_STEP_SIZE

    # the cache of the isolated measures, built as stream_diffusion_generate
    # prefills (chunks, then the last token alone); the prefill itself is timed
    # in the generation runs below
    cache = model.make_cache()
    if P > 1:
        model.encode(prompt[:-1], cache, chunk_size=chunk)
    model.encode(prompt[-1:], cache)
    mx.eval([c.state for c in cache])

    def commit(c):
        model.encode(canvas, c)
        mx.eval([x.state for x in c])

    results.measure("commit", lambda: repeat(spec, commit, setup=lambda: copy.deepcopy(cache)))
    results.measure("decoder", lambda: repeat(spec, lambda _: mx.eval(model.decode(canvas, cache))))
    logits = model.decode(canvas, cache)
    # the self-conditioning input the loop itself passes (probabilities in float32 models)
    prediction = predict(logits, mx.array(TEMPERATURE, mx.float32), Randomness(spec["seed"]))
    mode = spec.get("self_conditioning", "exact")
    top_k = DiffusionOptions.self_conditioning_k if mode == "top-k" else None
    sc = next_self_conditioning(prediction, model.dtype, top_k)
    mx.eval(sc)
    results.measure("decoder_sc", lambda: repeat(spec, lambda _: mx.eval(model.decode(canvas, cache, sc))))
    results.measure("sampler", lambda: ours_sampler(spec, model, cache, canvas, logits, mx))
    results["sampler_method"] = "direct: denoise_canvas driven by a model whose decode returns fixed logits"
    results.measure("attention_context", lambda: ours_attention(spec, model, mx))
    results.measure("products", lambda: ours_products(spec, model, mx))
    del cache, logits, prediction, sc

    # The real loop: one canvas of N steps, adaptive stopping off, no eos. The
    # response times the prompt (prefill) and the canvas (generation) apart.
    def generation_runs():
        out = {"canvas": [], "step": [], "prefill": []}
        for i in range(spec["warmup"] + spec["repeats"]):
            stamps, events = [], []
            options = dict(max_tokens=C, max_denoising_steps=N, confidence_threshold=NEVER_STOP, eos_token_id=[],
                           self_conditioning=mode)
            for event in stream_diffusion_generate(model, None, spec["prompt"], seed=spec["seed"] + i, **options):
                if type(event).__name__ == "Draft":
                    stamps.append(time.perf_counter())
                events.append(event)
            response = events[-1]
            if response.denoising_steps != N or response.generation_tokens != C:
                raise RuntimeError(f"expected {N} steps, {C} tokens; got {response.denoising_steps}, {response.generation_tokens}")
            if i >= spec["warmup"]:
                out["canvas"].append(response.generation_tokens / response.generation_tps)
                out["prefill"].append(response.prompt_tokens / response.prompt_tps)
                out["step"].extend(intervals(stamps))  # stamps end steps 1..N: steps 2..N, self-conditioned
        return out

    measure_loop(results, mx, generation_runs)
    results["step_method"] = "time between Draft events of stream_diffusion_generate (steps 2..N)"
    results["prefill_method"] = "stream_diffusion_generate's prompt time (chunks of 2048, then the last token)"
    mlx_memory(results, mx)


def ours_sampler(spec, model, cache, canvas, logits, mx):
    """Everything between the decoder's logits and the next decoder call, in
    the real loop: denoise_canvas with a decoder returning fixed logits."""
    from mlx_diffusiongemma.generate import DiffusionOptions, denoise_canvas
    from mlx_diffusiongemma.sampling import Randomness, StableAndConfidentStopping

    class FixedLogits:
        args, dtype = model.args, model.dtype

        def decode(self, canvas_ids, cache, **self_conditioning):
            return logits

    steps = 1 + spec["warmup"] + spec["repeats"]
    opts = DiffusionOptions.resolve(FixedLogits(), None, dict(max_denoising_steps=steps, confidence_threshold=NEVER_STOP,
                                                             eos_token_id=[], self_conditioning=spec.get("self_conditioning", "exact")))
    stopping = StableAndConfidentStopping(opts.stability_threshold, opts.confidence_threshold)
    loop = denoise_canvas(FixedLogits(), cache, canvas, opts, Randomness(spec["seed"]), opts.make_acceptance(), stopping)
    stamps = [time.perf_counter()]
    for _ in loop:
        stamps.append(time.perf_counter())
    return intervals(stamps)[1 + spec["warmup"]:]  # step 1 has no self-conditioning input; then warm-up


def ours_attention(spec, model, mx):
    """The canvas's queries attending to the cached context plus the canvas,
    every layer, on tensors of the real shapes (mx.fast.scaled_dot_product_attention)."""
    args, C, P = model.args, spec["canvas_length"], len(spec["prompt"])
    tensors = []
    for i, kind in enumerate(args.layer_types):
        head_dim, kv_heads = args.attention_shape(i)
        context = min(args.sliding_window - 1, P) if kind == "sliding_attention" else P
        q = mx.random.normal((1, args.num_attention_heads, C, head_dim)).astype(model.dtype)
        k = mx.random.normal((1, kv_heads, context + C, head_dim)).astype(model.dtype)
        v = mx.random.normal((1, kv_heads, context + C, head_dim)).astype(model.dtype)
        tensors.append((q, k, v))
    mx.eval(tensors)
    return repeat(spec, lambda _: mx.eval([mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0) for q, k, v in tensors]))


def ours_products(spec, model, mx):
    """The decoder's matrix products alone, every one a decoder pass with
    self-conditioning runs (projections, dense and expert feed-forwards,
    router, self-conditioning block and product, lm_head), on inputs of the
    real shapes, evaluated together: with the attention, the floor of a
    decoder pass that only removes everything else."""
    from mlx_diffusiongemma.model import soft_embed

    args, C = model.args, spec["canvas_length"]
    x = mx.random.normal((1, C, args.hidden_size)).astype(model.dtype)
    probs = mx.random.uniform(shape=(1, C, args.vocab_size)).astype(model.dtype)
    decoder = model.model.decoder
    indices = mx.random.randint(0, args.num_experts, (1, C, args.top_k_experts))
    mx.eval(x, probs, indices)

    def products(_):
        out = [soft_embed(decoder.embed_tokens, probs), decoder.embed_tokens.as_linear(x)]
        sc = decoder.self_conditioning
        out += [sc.down_proj(sc.gate_proj(x) * sc.up_proj(x))]
        for layer in model.layers:
            attn = layer.self_attn
            q = attn.q_proj(x)
            out += [attn.o_proj(q), attn.k_proj(x), layer.router.proj(x)]
            if attn.is_sliding:
                out.append(attn.v_proj(x))
            out.append(layer.mlp(x))
            out.append(layer.experts(x, indices, mx.ones(indices.shape, x.dtype)))
        mx.eval(out)

    return repeat(spec, products)


def random_ours(spec, mx):
    """real-26b: random weights of the released configuration, built in memory."""
    from mlx_diffusiongemma import Model, ModelArgs, quantize

    config = json.loads(Path(spec["checkpoint"], "config.json").read_text())
    model = Model(ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    if spec.get("bits"):
        quantize(model, bits=spec["bits"], group_size=64)
        mx.eval(model.parameters())
    return model


# ---------------------------------------------------------------- mlx-vlm


def run_mlx_vlm(spec, results):
    sys.path.insert(0, spec["peers_site"])
    import mlx.core as mx

    import mlx_vlm
    from mlx_vlm.generate.common import DEFAULT_PREFILL_STEP_SIZE, generation_stream
    from mlx_vlm.generate.diffusion import stream_diffusion_generate

    results["module"] = os.path.dirname(mlx_vlm.__file__)
    results["version"] = mlx_vlm.__version__
    mlx_common(spec, results, mx)
    if spec.get("random_init"):
        model, processor = random_mlx_vlm(spec, mx)
    else:
        model, processor = mlx_vlm.load(spec["checkpoint"])
    results["dtype"] = str(model.model.decoder.norm.weight.dtype)
    tokenizer = processor.tokenizer
    tokenizer.stopping_criteria.eos_token_ids = []  # no eos: whole canvases, as for the others
    C, N = spec["canvas_length"], spec["steps"]
    ids = mx.array([spec["prompt"]], dtype=mx.int32)
    canvas = mx.array([spec["canvas"]], dtype=mx.int32)
    # mlx_vlm.generate's --prefill-step-size default (the Python API's is one pass)
    step_size = DEFAULT_PREFILL_STEP_SIZE

    with mx.stream(generation_stream):  # as the engine runs
        # the cache of the isolated measures, prefilled as the engine does; the
        # prefill itself is timed in the generation runs below
        cache = model.diffusion_prefill_cache(
            ids, attention_mask=None, cache=model.make_cache(), pixel_values=None, mm_token_type_ids=None,
            prefill_step_size=step_size, chunk_prefill=ids.shape[1] > step_size,
        )
        mx.eval([c.state for c in cache])

        def commit(c):
            c = model.diffusion_update_cache(canvas, cache=c)
            mx.eval([x.state for x in c])

        results.measure("commit", lambda: repeat(spec, commit, setup=lambda: copy.deepcopy(cache)))
        masks = model.diffusion_decoder_masks(canvas, cache, None)  # once per canvas in the engine

        def decode(sc):
            return model.diffusion_decoder_logits(canvas, cache=cache, self_conditioning=sc, decoder_attention_mask=masks)

        results.measure("decoder", lambda: repeat(spec, lambda _: mx.eval(decode(None))))
        processed = decode(None) / TEMPERATURE
        mx.eval(processed)
        context = model.diffusion_prepare_self_conditioning()
        # The engine turns logits into self-conditioning embeddings after the draw
        # (diffusion_self_conditioning); counted here with the decoder, so that
        # "decoder with self-conditioning" starts from logits as for the others.
        results.measure(
            "decoder_sc",
            lambda: repeat(spec, lambda _: mx.eval(decode(model.diffusion_self_conditioning(processed, context)))),
        )
        results["sampler_method"] = "derived: full step - decoder with self-conditioning (no seam in the engine's inline loop)"
        del cache, masks, processed

    # The engine's real loop. Steps are timed at the entries of the decoder calls
    # (each entry first evaluates the canvas and self-conditioning the previous
    # step produced: the same work, evaluated there rather than inside the next
    # decoder graph). The engine skips the draw on the last step (cur_step == 1).
    generation_config = dict(model.config.generation_config or {})
    generation_config.update(max_denoising_steps=N, confidence_threshold=NEVER_STOP)
    model.config.generation_config = generation_config
    stamps = []
    decoder_logits = model.diffusion_decoder_logits

    def timed_decoder_logits(canvas_ids, cache=None, self_conditioning=None, decoder_attention_mask=None):
        mx.eval(canvas_ids if self_conditioning is None else [canvas_ids, self_conditioning])
        stamps.append(time.perf_counter())
        return decoder_logits(canvas_ids, cache=cache, self_conditioning=self_conditioning, decoder_attention_mask=decoder_attention_mask)

    def generation_runs():
        out = {"canvas": [], "step": [], "prefill": []}
        model.diffusion_decoder_logits = timed_decoder_logits
        try:
            for i in range(spec["warmup"] + spec["repeats"]):
                stamps.clear()
                mx.random.seed(spec["seed"] + i)
                for result in stream_diffusion_generate(
                    model, processor, tokenizer, ids, None, None,
                    max_tokens=C, skip_special_token_ids=[], temperature=1.0, max_denoising_steps=N,
                    diffusion_full_canvas=True, diffusion_sampler="entropy-bound", prefill_step_size=step_size,
                ):
                    pass
                if len(stamps) != N or result.generation_tokens != C:
                    raise RuntimeError(f"expected {N} decoder calls, {C} tokens; got {len(stamps)}, {result.generation_tokens}")
                if i >= spec["warmup"]:
                    # the engine's own clocks: prompt, then generation from after the prefill
                    out["canvas"].append(result.generation_tokens / result.generation_tps)
                    out["prefill"].append(result.prompt_tokens / result.prompt_tps)
                    # stamps start steps 1..N: steps 2..N-1, self-conditioned and with the draw
                    out["step"].extend(intervals(stamps)[1:])
        finally:
            model.diffusion_decoder_logits = decoder_logits
        return out

    measure_loop(results, mx, generation_runs)
    results["step_method"] = "between entries of model.diffusion_decoder_logits inside the engine's loop (steps 2..N-1)"
    results["prefill_method"] = "the engine's prompt time (prefill_step_size=2048, mlx_vlm.generate's CLI default)"
    results.note("its N-step canvas runs N decoder passes and N-1 draws (the last step takes the argmax only)")
    results.note("its decoder without self-conditioning still runs the self-conditioning MLP (on zeros)")
    mlx_memory(results, mx)


def random_mlx_vlm(spec, mx):
    """real-26b: mlx-vlm's model of the same configuration with random weights
    (bfloat16, optionally quantized with its own predicate) and its processor."""
    import mlx.nn as nn
    from mlx_vlm.models.diffusion_gemma import Model, ModelConfig
    from mlx_vlm.utils import load_config, load_processor

    config = load_config(Path(spec["checkpoint"]))
    model_config = ModelConfig.from_dict({k: v for k, v in config.items() if k != "vision_config"})
    model = Model(model_config)
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    if spec.get("bits"):
        predicate = model.quant_predicate
        nn.quantize(model, group_size=64, bits=spec["bits"], class_predicate=lambda p, m: predicate(p, m))
        mx.eval(model.parameters())
    model.eval()
    return model, load_processor(Path(spec["checkpoint"]), True, eos_token_ids=None)


# ---------------------------------------------------------------- transformers


def run_transformers(spec, results):
    import torch
    import transformers
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.cache_utils import DynamicCache

    results["version"] = transformers.__version__
    results["torch"] = torch.__version__
    results["threads"] = torch.get_num_threads()
    C, V, P, N = spec["canvas_length"], spec["vocab_size"], len(spec["prompt"]), spec["steps"]
    a = torch.randn(256, 256)
    a @ a
    info = [p.split("=")[1] for p in torch.__config__.show().replace("\n", ",").split(",") if "BLAS_INFO=" in p]
    # torch links MKL statically but calls sgemm_ through its symbol table: a
    # preloaded OpenBLAS takes those calls (LD_DEBUG=bindings shows it)
    results["blas"] = f"torch BLAS_INFO={info[0] if info else '?'}; sgemm_ -> {resolved('sgemm_') or 'torch itself'}"
    results["device"] = "cpu"
    x = torch.randn(1, C, V)
    results.measure("exp", lambda: repeat(spec, lambda _: torch.exp(x)))
    del x

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(spec["checkpoint"], dtype=torch.float32).eval()
    results["dtype"] = str(model.dtype)
    ids = torch.tensor([spec["prompt"]])
    canvas = torch.tensor([spec["canvas"]])
    text_config = model.config.get_text_config(decoder=True)

    @torch.no_grad()
    def encode(tokens, cache=None):
        cache = DynamicCache(config=text_config) if cache is None else cache
        model.model.encoder(input_ids=tokens, past_key_values=cache)
        return cache

    cache = encode(ids)  # the cache of the isolated measures; prefill is timed in the generation runs
    results.measure("commit", lambda: repeat(spec, lambda c: encode(canvas, c), setup=lambda: copy.deepcopy(cache)))

    # the decoder as generate calls it: precomputed masks and positions
    mask_mapping = model.model.decoder.create_diffusion_decoder_attention_mask(
        config=model.config, inputs_embeds=canvas.unsqueeze(-1), past_key_values=cache,
        decoder_attention_mask=torch.ones((1, P + C), dtype=torch.bool),
    )
    positions = torch.arange(P, P + C, dtype=torch.int32).unsqueeze(0)

    @torch.no_grad()
    def decode(sc):
        return model(
            decoder_input_ids=canvas, self_conditioning_logits=sc, decoder_attention_mask=mask_mapping,
            past_key_values=cache, decoder_position_ids=positions,
        ).logits

    results.measure("decoder", lambda: repeat(spec, lambda _: decode(None)))
    logits = decode(None)
    sc = (logits / TEMPERATURE).to(model.model.decoder.embed_tokens.weight.dtype)
    results.measure("decoder_sc", lambda: repeat(spec, lambda _: decode(sc)))

    generation_config, _ = model._prepare_generation_config(None, max_denoising_steps=N, confidence_threshold=NEVER_STOP)

    @torch.no_grad()
    def sampler_steps():
        # generate's own _denoising_step with a decoder that returns fixed logits
        sampler = model._prepare_sampler(generation_config)
        processors = model._prepare_logits_processor(generation_config)
        stopping = model._prepare_diffusion_stopping_criteria(generation_config)
        fixed = SimpleNamespace(logits=logits)
        current, argmax, finished = canvas, canvas, torch.zeros(1, dtype=torch.bool)
        samples = []
        for i in range(spec["warmup"] + spec["repeats"]):
            start = time.perf_counter()
            current, argmax, _, finished = model._denoising_step(
                decoder_forward=lambda **kwargs: fixed, current_canvas=current, argmax_canvas=argmax, input_ids=ids,
                decoder_position_ids=positions, self_conditioning_logits=sc, mask_mapping=mask_mapping,
                past_key_values=cache, finished_denoising=finished, cur_step=max(N - i, 1), sampler=sampler,
                logits_processor=processors, diffusion_stopping_criteria=stopping,
            )
            if i >= spec["warmup"]:
                samples.append(time.perf_counter() - start)
        return samples

    results.measure("sampler", sampler_steps)
    results["sampler_method"] = "direct: generate's _denoising_step with a decoder_forward returning fixed logits"

    # The real loop: generate, one canvas of N steps, adaptive stopping off.
    # Forward hooks on the encoder time its prompt pass; a wrapper on the
    # instance times each _denoising_step generate calls.
    del cache, logits, sc
    marks, durations = {}, []
    denoising_step = model._denoising_step

    def timed_step(*args, **kwargs):
        start = time.perf_counter()
        out = denoising_step(*args, **kwargs)
        durations.append(time.perf_counter() - start)
        return out

    def generation_runs():
        out = {"canvas": [], "step": [], "prefill": []}
        model._denoising_step = timed_step
        def mark(name):
            def hook(*_):  # returns None: the hook changes neither inputs nor outputs
                marks.setdefault(name, time.perf_counter())
            return hook

        hooks = [
            model.model.encoder.register_forward_pre_hook(mark("encoder_start")),
            model.model.encoder.register_forward_hook(mark("encoder_end")),
        ]
        try:
            for i in range(spec["warmup"] + spec["repeats"]):
                durations.clear()
                marks.clear()
                torch.manual_seed(spec["seed"] + i)
                out_ids = model.generate(
                    input_ids=ids, max_new_tokens=C, max_denoising_steps=N, confidence_threshold=NEVER_STOP,
                    disable_compile=True,
                )
                end = time.perf_counter()
                if len(durations) != N or out_ids.sequences.shape[1] != P + C:
                    raise RuntimeError(f"expected {N} steps, {C} tokens; got {len(durations)}, {out_ids.sequences.shape[1] - P}")
                if i >= spec["warmup"]:
                    out["prefill"].append(marks["encoder_end"] - marks["encoder_start"])
                    out["canvas"].append(end - marks["encoder_end"])
                    out["step"].extend(durations[1:])  # steps 2..N: self-conditioned
        finally:
            del model._denoising_step  # the class's method again
            for hook in hooks:
                hook.remove()
        return out

    results.measure_runs(generation_runs)
    results["step_method"] = "each _denoising_step call inside generate (steps 2..N)"
    results["prefill_method"] = "generate's encoder pass over the prompt (forward hooks)"
    results.note("canvas time: generate from the end of its prompt pass to its return")
    results["peak_rss_gb"] = peak_rss_gb()


# ---------------------------------------------------------------- build, probe


def build(spec, results):
    """A random reference checkpoint saved with transformers' save_pretrained,
    in the global_head_dim config form (which ours, mlx-vlm and transformers
    all read), with the reference's sampler settings and a word-level tokenizer."""
    import shutil

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers.reference import build_reference, save_reference
    from helpers.tiny_tokenizer import write_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    final = Path(spec["checkpoint"])
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model = build_reference(seed=spec["seed"], canvas_length=spec["canvas_length"], perturb=True, **spec["text"])
    save_reference(model, staging, global_head_dim_form=True)
    (staging / "generation_config.json").write_text(json.dumps(reference_generation_config(48), indent=2))
    write_tokenizer(staging, vocab_size=spec["text"]["vocab_size"])
    staging.rename(final)
    results["checkpoint"] = str(final)


def write_config_only(spec, results):
    """real-26b: config, generation config and tokenizer, no weights (each
    worker builds random weights in memory)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers.tiny_tokenizer import write_tokenizer

    final = Path(spec["checkpoint"])
    final.mkdir(parents=True, exist_ok=True)
    (final / "config.json").write_text(json.dumps(spec["config_json"], indent=2))
    (final / "generation_config.json").write_text(json.dumps(reference_generation_config(48), indent=2))
    write_tokenizer(final, vocab_size=spec["config_json"]["text_config"]["vocab_size"])


def probe(spec, results):
    import mlx.core as mx

    results["default_device"] = str(mx.default_device())
    results["gpu"] = mx.default_device() == mx.gpu
    results["mlx"] = mx.__version__


WORKERS = {
    "ours": run_ours,
    "ours-top-k": lambda spec, results: run_ours(dict(spec, self_conditioning="top-k"), results),
    "mlx-vlm": run_mlx_vlm,
    "transformers": run_transformers,
    "build": build,
    "config-only": write_config_only,
    "probe": probe,
}


def main():
    kind, spec_path, out_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    spec.setdefault("impl", kind)
    spec.setdefault("config", "")
    results = Results(spec)
    start = time.perf_counter()
    try:
        WORKERS[kind](spec, results)
    except Exception as e:  # noqa: BLE001 - the driver prints it
        results["error"] = f"{type(e).__name__}: {e}"[:600]
        traceback.print_exc(file=sys.stderr)
    results["wall_s"] = time.perf_counter() - start
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
