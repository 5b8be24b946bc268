"""Quality of the embedded demo model with the default reference sampler:
exact-match on held-out digit-sorting problems and tokens committed per
decoder pass (the issue asks for >= 95% and > 2).

    python benchmarks/demo_quality.py [--problems 500] [--model demo] [--no-fused-sampling]
"""

import argparse
import time

from mlx_diffusiongemma import load
from mlx_diffusiongemma.demo import problems, score

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--no-fused-sampling", dest="fused_sampling", action="store_false",
                        help="on a GPU, the MLX path instead of the fused sampler kernel")
    args = parser.parse_args()
    model, tokenizer = load(args.model)
    start = time.perf_counter()
    exact, mean, pooled = score(model, tokenizer, problems(args.problems, seed=2), fused_sampling=args.fused_sampling)  # held out
    print(
        f"{args.problems} held-out problems: exact-match {exact:.1%}, tokens per decoder pass {mean:.2f} "
        f"(mean of each response's tokens_per_forward; {pooled:.2f} pooled over all passes) "
        f"({time.perf_counter() - start:.1f} s)"
    )
