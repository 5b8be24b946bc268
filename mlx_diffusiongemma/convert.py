"""`python -m mlx_diffusiongemma.convert`: a Hugging Face DiffusionGemma checkpoint
in, an mlx-community style repo out (the layout mlx-vlm writes), optionally quantized.

Streams: tensors are read lazily from the safetensors files, cast and quantized one
at a time, and written into shards as they fill, so the whole model is never in
memory (peak is about one output shard plus one input tensor). The quantization
plan is `quantization_plan`'s, the one `quantize` applies in memory, so a converted
repo loads to exactly the model that `load_model` + `quantize` build. Only
safetensors are read: nothing in a checkpoint is unpickled or executed.
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
from huggingface_hub import HfApi, ModelCardData
from mlx_lm.utils import save_config

from .arguments import ArgumentParser, checked
from .config import ModelArgs, check_range
from .load import (
    copy_companions,
    GROUP_SIZES,
    RECIPES,
    _as_dtype,
    check_weights,
    load_config,
    load_generation_config,
    load_safetensors,
    quantization_of,
    quantization_plan,
    resolve,
)
from .model import VISION_PREFIXES, Model
from .staging import claimed, staged

MODE_BITS = {"mxfp4": 4, "nvfp4": 4, "mxfp8": 8}  # the float modes allow one width each
DEFAULT_SHARD_GB = 5.0  # as mlx-lm


class _ShardWriter:
    """Collects evaluated tensors and writes a shard as soon as the next tensor
    would overflow it (a larger tensor gets a shard of its own, as in mlx-lm's
    `make_shards`), so at most one shard is held in memory. Shards get their
    final `-of-n` names in `finish`, once n is known."""

    def __init__(self, path: Path, max_bytes: int):
        self.path, self.max_bytes = path, max_bytes
        self.shard, self.shard_bytes = {}, 0
        self.files, self.weight_map, self.total_size = [], {}, 0

    def add(self, tensors: dict) -> None:
        for name, value in tensors.items():
            if self.shard and self.shard_bytes + value.nbytes > self.max_bytes:
                self.flush()
            self.shard[name] = value
            self.shard_bytes += value.nbytes

    def flush(self) -> None:
        if not self.shard:
            return
        name = f"model-{len(self.files) + 1:05d}.safetensors"
        mx.save_safetensors(str(self.path / name), self.shard, metadata={"format": "mlx"})
        self.weight_map.update(dict.fromkeys(self.shard, len(self.files)))
        self.files.append(name)
        self.total_size += self.shard_bytes
        self.shard, self.shard_bytes = {}, 0
        mx.clear_cache()  # freed shard buffers would otherwise stay resident in mlx's cache

    def finish(self, total_parameters: int) -> dict:
        self.flush()
        n = len(self.files)
        names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        for temporary, final in zip(self.files, names):
            os.replace(self.path / temporary, self.path / final)
        index = {
            "metadata": {"total_size": self.total_size, "total_parameters": total_parameters},
            "weight_map": {k: names[i] for k, i in sorted(self.weight_map.items())},
        }
        (self.path / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
        return index


def _convert_tensor(name: str, weight: mx.array, plan: dict, dtype: Optional[mx.Dtype]) -> dict:
    """One checkpoint tensor as the output tensors of its module, evaluated: cast
    first, then quantized as `to_quantized` would (`.weight`, `.scales`, `.biases`)."""
    if dtype is not None and mx.issubdtype(weight.dtype, mx.floating):
        weight = weight.astype(dtype)
    module, _, leaf = name.rpartition(".")
    entry = plan.get(module) if leaf == "weight" else None
    if entry is None:
        out = {name: weight}
    else:
        wq, scales, *biases = mx.quantize(
            weight, entry["group_size"], entry["bits"], mode=entry.get("mode", "affine")
        )
        out = {f"{module}.weight": wq, f"{module}.scales": scales}
        if biases:
            out[f"{module}.biases"] = biases[0]
    mx.eval(out)
    return out


def _describe(quantization: Optional[dict], dtype: str) -> str:
    """The recipe in words, for the log and the model card."""
    if quantization is None:
        return f"not quantized; weights in {dtype}"
    q = quantization
    return (
        f"mlx-community recipe: experts and self-conditioning {q['bits']}-bit {q['mode']} (group size "
        f"{q['group_size']}); embeddings, attention, dense MLP and router 8-bit affine (group size 64); "
        f"norms, router scales, layer scalars and the vision tower unquantized ({dtype})"
    )


def _model_card(source: str, dst: Path, upload_repo: Optional[str], description: str, index: dict) -> str:
    """README.md: where the weights come from, how they were quantized, how big, how to run."""
    hub_source = not Path(source).expanduser().exists()  # as `resolve` decides
    title, ref = (upload_repo, upload_repo) if upload_repo else (dst.name, str(dst))
    size = index["metadata"]["total_size"]
    bits_per_weight = 8 * size / index["metadata"]["total_parameters"]
    data = ModelCardData(
        library_name="mlx",
        pipeline_tag="text-generation",
        tags=["mlx", "diffusion_gemma"],
        base_model=source if hub_source else None,
    )
    origin = f"[{source}](https://huggingface.co/{source})" if hub_source else f"`{source}`"
    shards = len(set(index["weight_map"].values()))
    return f"""---
{data.to_yaml()}
---

# {title}

Converted to MLX from {origin} with `python -m mlx_diffusiongemma.convert`.

- Quantization: {description}.
- Size: {size / 1e9:.2f} GB in {shards} safetensors shard(s), {bits_per_weight:.2f} bits per weight.

## Use

```bash
pip install mlx-diffusiongemma
python -m mlx_diffusiongemma.generate --model {ref} --prompt "Why is the sky blue?"
```

With mlx-diffusiongemma installed, mlx-lm runs it too (`mlx_lm.chat` and `mlx_lm.server`
as well). The layout is that of the mlx-community DiffusionGemma conversions (made by
mlx-vlm), so mlx-vlm reads it (text and images):

```bash
mlx_lm.generate --model {ref} --prompt "Why is the sky blue?"
```
"""


def check_shard_size(max_shard_size_gb) -> float:
    """A shard limit of 0 or less would write one shard per tensor."""
    return float(check_range("max_shard_size_gb", max_shard_size_gb, 0, low_inclusive=False, expected="a finite number > 0"))


def _check_destination(dst: Path, force: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise FileExistsError(f"{dst} exists and is not empty; pass --force to replace it")


def convert(
    hf_path: Union[str, Path],
    mlx_path: Union[str, Path] = "mlx_model",
    quantize: bool = False,
    q_group_size: Optional[int] = None,
    q_bits: Optional[int] = None,
    q_mode: str = "affine",
    dtype: Optional[str] = None,
    quant_predicate: str = "mlx-community",
    upload_repo: Optional[str] = None,
    force: bool = False,
    max_shard_size_gb: float = DEFAULT_SHARD_GB,
) -> Path:
    """Convert `hf_path` (a directory or hub repo id) into `mlx_path`.

    Everything is written to a hidden sibling of `mlx_path` that replaces it
    only once complete (`staging.staged`), so a failed or interrupted run leaves
    no (or the old) output. The run holds `mlx_path` from its first check to the
    swap (`staging.claimed`): a second run into it is refused, and without
    `force` nothing found there at the swap is replaced, even if it appeared
    during the run. Without `dtype` weights keep the checkpoint's dtype. `q_bits` and
    `q_group_size` default as in mlx-lm (4 and 64; the float modes fix both).
    """
    max_bytes = int(check_shard_size(max_shard_size_gb) * (1 << 30))
    if q_mode in MODE_BITS and q_bits not in (None, MODE_BITS[q_mode]):
        raise ValueError(f"--q-mode {q_mode} quantizes to {MODE_BITS[q_mode]} bits, not {q_bits}")
    if quant_predicate not in RECIPES:
        raise ValueError(f"unknown recipe {quant_predicate!r}; choose one of {sorted(RECIPES)}")
    cast = _as_dtype(dtype) if dtype is not None else None
    dst = Path(mlx_path).expanduser()
    with claimed(dst):  # from the first check to the swap
        _check_destination(dst, force)
        src, config, skeleton, tensors = _read_source(hf_path, dst)
        kept_dtype = dtype or str(tensors["model.decoder.norm.weight"].dtype).rpartition(".")[2]

        plan, quantization = {}, None
        if quantize:
            bits = q_bits or MODE_BITS.get(q_mode, 4)
            plan, quantization = quantization_plan(skeleton, bits, q_group_size or 64, q_mode, quant_predicate)
            config["quantization"] = quantization  # save_config adds the `quantization_config` copy
        if dtype is not None:
            for section in (config, config.get("text_config") or {}):
                for key in ("dtype", "torch_dtype"):
                    if key in section:
                        section[key] = dtype
        description = _describe(quantization, kept_dtype)

        print(f"[INFO] Converting {len(tensors)} tensors from {src}: {description}")
        with staged(dst, replace=force) as staging:
            writer = _ShardWriter(staging, max_bytes)
            total_parameters = 0
            for name in list(tensors):
                total_parameters += tensors[name].size
                # popped, so nothing here keeps the input alive once it is converted
                writer.add(_convert_tensor(name, tensors.pop(name), plan, cast))
            index = writer.finish(total_parameters)
            save_config(config, staging / "config.json", keep_vision_config=True)
            copied = copy_companions(src, staging)
            if not {"tokenizer.json", "tokenizer.model"} & set(copied):
                print(f"[WARN] {src} has no tokenizer.json or tokenizer.model: the output has no tokenizer")
            (staging / "README.md").write_text(_model_card(str(hf_path), dst, upload_repo, description, index))
        print(f"[INFO] Wrote {dst}: {index['metadata']['total_size'] / 1e9:.2f} GB in {len(writer.files)} shard(s)")
        if upload_repo is not None:
            try:
                upload(dst, upload_repo)
            except KeyboardInterrupt:
                raise KeyboardInterrupt(f"{dst} written, its upload to {upload_repo} not finished") from None
    return dst


def _read_source(hf_path: Union[str, Path], dst: Path) -> tuple:
    """(directory, config, model skeleton, tensors under their output names) of
    the checkpoint, checked as the loader checks it; tensors are lazy, only the
    safetensors headers are read."""
    src = resolve(hf_path)
    if dst.resolve() == src.resolve() or dst.resolve() in src.resolve().parents:
        raise ValueError(f"{dst} holds the source checkpoint {src}; choose another output directory")
    config = load_config(src)
    if quantization_of(config) is not None:
        raise ValueError(f"{src / 'config.json'}: the checkpoint is already quantized; convert the original one")
    try:
        args = ModelArgs.from_dict(config)
        skeleton = Model(args)  # lazy: only names and shapes are used
    except (TypeError, ValueError) as e:
        raise ValueError(f"{src / 'config.json'}: {e}") from None
    load_generation_config(src, args)  # copied as is: refused here rather than by the output's loader

    _add_global_head_dim(config)
    weights = load_safetensors(src)
    check_weights(skeleton, skeleton.sanitize(weights), src)  # the loader's own checks, up front
    names = {old: new for new, old in skeleton.sanitize({k: k for k in weights}).items()}  # its renaming
    names.update((k, k) for k in weights if k.startswith(VISION_PREFIXES))
    tensors = {names[k]: v for k, v in weights.items() if k in names}  # lm_head and tied copies dropped
    return src, config, skeleton, tensors


def upload(path: Path, repo: str) -> None:
    """Create (or reuse) the hub model repo and upload the converted directory."""
    api = HfApi()
    api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
    api.upload_folder(folder_path=str(path), repo_id=repo, repo_type="model")
    print(f"[INFO] Uploaded to https://huggingface.co/{repo}")


def _add_global_head_dim(config: dict) -> None:
    """Also write the full-attention override in the older `global_head_dim` /
    `num_global_key_value_heads` form, which mlx-vlm reads (it ignores
    `per_layer_config`). Our loader prefers `per_layer_config`."""
    text = config.get("text_config") or {}
    overrides = list((text.get("per_layer_config") or {}).values())
    if not overrides or text.get("global_head_dim") is not None:
        return
    if any(o != overrides[0] for o in overrides):
        return  # not expressible in the older form
    if "head_dim" in overrides[0]:
        text["global_head_dim"] = overrides[0]["head_dim"]
    if "num_key_value_heads" in overrides[0]:
        text["num_global_key_value_heads"] = overrides[0]["num_key_value_heads"]


def configure_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m mlx_diffusiongemma.convert",
        description="Convert a Hugging Face DiffusionGemma checkpoint to MLX (mlx-community layout).",
    )
    parser.add_argument("--hf-path", "--model", required=True, help="Local directory or Hugging Face repo id.")
    parser.add_argument("--mlx-path", default="mlx_model", help="Output directory (default: mlx_model).")
    parser.add_argument("-q", "--quantize", action="store_true", help="Quantize the model.")
    parser.add_argument("--q-bits", type=int, choices=[2, 3, 4, 5, 6, 8], help="Bits of the experts and "
                        "self-conditioning (default 4; 8 for mxfp8). The other modules stay at 8 bits.")
    parser.add_argument("--q-group-size", type=int, choices=GROUP_SIZES["affine"],
                        help="Group size for affine mode (default 64); mxfp4/mxfp8 use 32, nvfp4 16.")
    parser.add_argument("--q-mode", choices=list(GROUP_SIZES), help="Quantization mode (default affine).")
    parser.add_argument("--quant-predicate", choices=sorted(RECIPES), help="Which modules get which setting: "
                        "mlx-community (default) keeps embeddings, attention, dense MLP and router at 8 bits.")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                        help="dtype of the unquantized weights and scales (default: the checkpoint's).")
    parser.add_argument("--max-shard-size-gb", type=checked(float, check_shard_size), default=DEFAULT_SHARD_GB,
                        help=f"Largest output shard in GiB (default {DEFAULT_SHARD_GB:g}).")
    parser.add_argument("--upload-repo", help="Hugging Face repo to upload the result to.")
    parser.add_argument("--force", action="store_true", help="Replace a non-empty --mlx-path (at the very end).")
    return parser


def main(argv=None) -> None:
    parser = configure_parser()
    args = parser.parse_args(argv)
    q_options = ("q_bits", "q_group_size", "q_mode", "quant_predicate")
    if not args.quantize and any(getattr(args, k) is not None for k in q_options):
        parser.error("--q-bits, --q-group-size, --q-mode and --quant-predicate need -q/--quantize")
    options = {k: v for k, v in vars(args).items() if v is not None}
    # SIGTERM as an exception, so `convert` removes its temporary directory on the way out.
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    try:
        convert(**options)
    except (OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # Ctrl-C: by now `staged` and `claimed` have cleaned up
        print(f"{parser.prog}: interrupted; {str(e) or f'{args.mlx_path} left as it was'}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
