"""`python -m mlx_diffusiongemma`: a self-check on a small random model.

Builds the DiffusionGemma architecture at toy size, prefills a prompt longer than
the sliding window, denoises one canvas, commits it, and checks that decoding
leaves the cache alone. It needs no checkpoint and no network.
"""

import time

import mlx.core as mx

from . import Model, ModelArgs


def main() -> None:
    args = ModelArgs.from_dict(
        {
            "model_type": "diffusion_gemma",
            "canvas_length": 16,
            "text_config": {
                "hidden_size": 64, "num_hidden_layers": 6, "intermediate_size": 128,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                "global_head_dim": 32, "num_global_key_value_heads": 1, "sliding_window": 8,
                "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 64, "vocab_size": 512,
            },
        }
    )
    mx.random.seed(0)
    model = Model(args)
    cache = model.make_cache()
    prompt = mx.random.randint(0, args.vocab_size, (40,))
    start = time.perf_counter()
    model.encode(prompt, cache)
    canvas = mx.random.randint(0, args.vocab_size, (args.canvas_length,))
    offsets = [c.offset for c in cache]
    logits = model.decode(canvas, cache)
    again = model.decode(canvas, cache, self_conditioning_logits=logits)
    mx.eval(logits, again)
    assert [c.offset for c in cache] == offsets, "decode changed the cache"
    assert logits.shape == (1, args.canvas_length, args.vocab_size) and logits.dtype == mx.float32
    assert bool(mx.all(mx.abs(logits) <= args.final_logit_softcapping)), "logits not softcapped"
    model.encode(logits.argmax(-1), cache)
    assert cache[0].offset == 40 + args.canvas_length
    print(
        f"self-check passed on {mx.default_device()}: {args.num_hidden_layers} layers, "
        f"prompt 40 tokens, canvas {args.canvas_length}, logits {tuple(logits.shape)}, "
        f"{time.perf_counter() - start:.2f} s"
    )


if __name__ == "__main__":
    main()
