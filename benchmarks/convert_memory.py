"""Peak resident memory of a streaming conversion, against its bound.

Writes a synthetic Hugging Face checkpoint with the real 26B-A4B shapes (the full
262144 x 2816 embedding table, `--layers` real layers, the last one full-attention;
random bfloat16, one safetensors shard per layer), converts it to 4 bits with
`python -m mlx_diffusiongemma.convert` in a subprocess for each `--max-shard-size-gb`,
and compares the converter's peak RSS with 2 x largest output shard + largest
input tensor.

    python benchmarks/convert_memory.py [--layers 2] [--max-shard-size-gb 5 0.5] [--dir /tmp]

The peak comes from wait4's ru_maxrss, which a child inherits from its parent at
fork; so this process imports nothing heavy and writes the checkpoint in a child too.
"""

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_CONFIG = json.loads((ROOT / "tests" / "real_26b_config.json").read_text())

GB = 1e9


def real_config(layers: int) -> dict:
    """The 26B config with fewer layers (real shapes, the 5:1 pattern, last layer full)."""
    kinds = ["full_attention" if (i + 1) % 6 == 0 or i == layers - 1 else "sliding_attention" for i in range(layers)]
    full = {str(i): {"head_dim": 512, "num_key_value_heads": 2} for i, k in enumerate(kinds) if k == "full_attention"}
    text = {**REAL_CONFIG["text_config"], "num_hidden_layers": layers, "layer_types": kinds, "per_layer_config": full}
    return {**REAL_CONFIG, "architectures": ["DiffusionGemmaForBlockDiffusion"], "dtype": "bfloat16", "text_config": text}


def write_checkpoint(path: Path, layers: int) -> None:
    """The checkpoint under its Hugging Face names (run in a child process)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_diffusiongemma import Model, ModelArgs

    config = real_config(layers)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    params = dict(tree_flatten(Model(ModelArgs.from_dict(config)).parameters()))  # lazy: shapes only
    groups = [{} for _ in range(layers + 1)]  # file 1: everything outside the layers
    for name, value in params.items():
        hf_name = name.removesuffix(".weight") if ".experts." in name else name
        layer = int(name.split(".")[3]) + 1 if name.startswith("model.decoder.layers.") else 0
        groups[layer][hf_name] = value.shape
    # mlx's CPU random generator is slow: tile one random block (the bytes' values do not matter here).
    block = (0.02 * mx.random.normal((1 << 24,))).astype(mx.bfloat16)
    weight_map, n = {}, len(groups)
    for i, group in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for k, shape in group.items():
            size = math.prod(shape)
            tensors[k] = mx.tile(block, -(-size // block.size))[:size].reshape(shape)
            mx.eval(tensors[k])
        mx.save_safetensors(str(path / file), tensors, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
        mx.clear_cache()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def tensor_bytes(path: Path) -> dict:
    """{name: bytes} from a safetensors header, without reading the data."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def run(command: list) -> tuple:
    """(peak RSS in bytes, seconds) of a child process, from wait4."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    start = time.perf_counter()
    proc = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": pythonpath}, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(command)}")
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-shard-size-gb", type=float, nargs="+", default=[5.0, 0.5])
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: the temp dir)")
    parser.add_argument("--write-checkpoint", help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args()
    if args.write_checkpoint:
        return write_checkpoint(Path(args.write_checkpoint), args.layers)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        src = Path(tmp) / "hf"
        src.mkdir()
        _, seconds = run([sys.executable, __file__, "--layers", str(args.layers), "--write-checkpoint", str(src)])
        sizes = {k: v for f in src.glob("*.safetensors") for k, v in tensor_bytes(f).items()}
        largest_tensor = max(sizes.values())
        print(f"input: embeddings + {args.layers} real layers, {sum(sizes.values()) / GB:.2f} GB bfloat16 in "
              f"{args.layers + 1} files, largest tensor {largest_tensor / GB:.2f} GB (written in {seconds:.0f} s)")
        baseline, _ = run([sys.executable, "-c", "import mlx_diffusiongemma.convert"])
        print(f"importing the converter alone: peak RSS {baseline / GB:.2f} GB")
        ok = True
        for shard_gb in args.max_shard_size_gb:
            out = Path(tmp) / f"out-{shard_gb:g}"
            peak, seconds = run([
                sys.executable, "-m", "mlx_diffusiongemma.convert", "--hf-path", str(src), "--mlx-path", str(out),
                "-q", "--q-bits", "4", "--max-shard-size-gb", str(shard_gb),
            ])
            shards = [f.stat().st_size for f in out.glob("*.safetensors")]
            bound = 2 * max(shards) + largest_tensor
            ok &= peak < bound
            print(f"--max-shard-size-gb {shard_gb:g}: {len(shards)} shard(s), {sum(shards) / GB:.2f} GB, largest "
                  f"{max(shards) / GB:.2f} GB; peak RSS {peak / GB:.2f} GB vs bound {bound / GB:.2f} GB "
                  f"({'below' if peak < bound else 'ABOVE'}); {seconds:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
