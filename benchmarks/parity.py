"""Max |logit difference| against the transformers reference, per stage.

Compares our float32 MLX model with the reference in float32 and with the same
reference evaluated in float64 (the float32 rounding floor), on the random test
checkpoint of tests/helpers/reference.py. Needs the test extra (torch, transformers).

    python benchmarks/parity.py [--layers 4] [--seeds 3]
"""

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.reference import ReferenceRunner, build_reference, save_reference  # noqa: E402

from mlx_diffusiongemma import load_model  # noqa: E402


def stages(seed: int, layers: int):
    overrides = {} if layers == 4 else {"num_hidden_layers": layers, "layer_types": None}
    reference = build_reference(seed=seed, **overrides)
    exact = copy.deepcopy(reference).double()
    exact.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(save_reference(reference, Path(tmp)))
    rng = np.random.default_rng(seed)
    prompt, canvas, following = (rng.integers(0, 320, n).tolist() for n in (21, 12, 12))
    ref32, ref64, cache = ReferenceRunner(reference), ReferenceRunner(exact), model.make_cache()
    for runner in (ref32, ref64):
        runner.encode(prompt)
    model.encode(prompt, cache)
    sc = ref32.decode(canvas)
    calls = [
        ("decode", lambda r: r.decode(canvas), lambda: model.decode(canvas, cache)),
        ("self-conditioned", lambda r: r.decode(canvas, sc), lambda: model.decode(canvas, cache, mx.array(sc))),
    ]
    for name, ref_call, our_call in calls:
        yield name, ref_call(ref32), ref_call(ref64), np.array(our_call())
    for runner in (ref32, ref64):
        runner.encode(canvas)
    model.encode(canvas, cache)
    yield "after commit", ref32.decode(following), ref64.decode(following), np.array(model.decode(following, cache))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(f"{'seed':>4} {'stage':<18} {'ours-ref32':>11} {'ours-ref64':>11} {'ref32-ref64':>11}")
    worst = 0.0
    for seed in range(args.seeds):
        for name, r32, r64, ours in stages(seed, args.layers):
            d = [float(np.abs(a - b).max()) for a, b in ((ours, r32), (ours, r64), (r32, r64))]
            worst = max(worst, d[0])
            print(f"{seed:>4} {name:<18} {d[0]:>11.2e} {d[1]:>11.2e} {d[2]:>11.2e}")
    print(f"worst ours-ref32: {worst:.2e}")


if __name__ == "__main__":
    main()
