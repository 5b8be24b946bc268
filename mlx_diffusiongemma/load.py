"""Checkpoints in, model out: config, weights, sanitize, quantize, strict checks.

Accepts the original Hugging Face layout and the mlx-community layout made by
mlx-vlm (quantized modules with `.scales` / `.biases`, per-module entries in
`quantization` / `quantization_config`).
"""

import glob
import json
import reprlib
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import infer_quant_config, load_tokenizer, save_config
from mlx_lm.utils import save_model as save_weights

from .config import IMAGE_TOKEN_FIELDS, MODEL_TYPE, GenerationConfig, ModelArgs
from .model import VISION_PREFIXES, Model
from .images import SUPPORTED_SOFT_TOKENS
from .vision import VisionConfig, VisionModel, load_vision_weights, sanitize_vision
from .staging import claimed, staged

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]

# Modules the mlx-community recipe pins at 8 bits group 64 whatever the chosen setting.
_EIGHT_BIT_SUFFIXES = ("embed_tokens", "router.proj")
_EIGHT_BIT_PARTS = (".self_attn.", ".mlp.")


DEMO = "demo"  # the small model shipped inside the package (see demo.py)

_SHOWN = reprlib.Repr()  # a value in a message: long containers cut short, file names whole
_SHOWN.maxstring = 200


def resolve(path_or_repo: Union[str, Path]) -> Path:
    """"demo", a local directory, or a hub repo id fetched (or found in the local
    cache) with huggingface_hub, which honours HF_HUB_OFFLINE and HF_HUB_CACHE."""
    if str(path_or_repo) == DEMO and not Path(DEMO).exists():
        return Path(__file__).parent / "demo_model"
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is not a model directory")
        return path
    repo = str(path_or_repo)
    if repo.count("/") != 1 or repo.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model directory {repo} does not exist (and is not a hub repo id like org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{repo} is not in the local Hugging Face cache and the hub cannot be reached ({e})"
        ) from None
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"cannot download {repo} from the hub: {e}") from None


def _read_json(file: Path) -> dict:
    """The JSON object `file` holds; anything else is a ValueError naming the file."""
    try:
        value = json.loads(file.read_bytes())  # bytes: json detects UTF-8/16/32 itself
    except (ValueError, RecursionError) as e:  # bad JSON or text, an int past Python's digit limit, deep nesting
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file} must hold a JSON object, got {_SHOWN.repr(value)}")
    return value


def load_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a model directory")
    config = _read_json(config_file)
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise ValueError(
            f"{config_file}: model_type is {model_type!r}, but this package loads DiffusionGemma "
            f"checkpoints (model_type {MODEL_TYPE!r})"
        )
    return config


def _indexed_shards(path: Path, index_file: Path) -> list:
    """The shard files an index names. Each must be a plain `.safetensors` file
    name, so the index cannot make the loader read a file outside the
    checkpoint: the same files the unindexed glob would find. The shard itself
    may be a symlink, as in the hub cache (its snapshots link into its blobs)."""
    weight_map = _read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(
            f"{index_file} is not a valid safetensors index: weight_map must be an object of weight names "
            f"to shard files, got {_SHOWN.repr(weight_map)}"
        )
    for key, name in weight_map.items():
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise ValueError(
                f"{index_file}: weight_map[{_SHOWN.repr(key)}] is {_SHOWN.repr(name)}, but a shard must be "
                f"the name of a .safetensors file in {path} (no directory part)"
            )
    files = [path / name for name in sorted(set(weight_map.values()))]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{index_file} points at shard {f.name}, which is missing from {path}")
    return files


def load_safetensors(path: Path) -> dict:
    """Every tensor of a checkpoint, sharded (with an index) or not."""
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        files = _indexed_shards(path, index_file)
    else:
        files = [Path(f) for f in sorted(glob.glob(str(path / "*.safetensors")))]
        if not files:
            raise FileNotFoundError(f"no .safetensors weights in {path}")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mlx raises RuntimeError / ValueError for bad files
            raise ValueError(f"cannot read {f}: {e} (truncated or corrupt safetensors file?)") from None
    return weights


def quantization_of(config: dict) -> Optional[dict]:
    """The mlx quantization entries (`quantization`, or its copy `quantization_config`)."""
    for key in ("quantization", "quantization_config"):
        q = config.get(key)
        if isinstance(q, dict) and "bits" in q and "group_size" in q:
            return q
    return None


def check_quantization(quantization: dict, config_file: Path, model: nn.Module) -> None:
    """The setting and each of the model's modules' entries (a setting, or
    true/false) as mx.quantize takes them, checked here where the message can
    name the file: mlx refuses a bad one with a message naming neither (a
    group size of 0 crashes the process). Other keys are not read."""
    _check_setting(quantization, "quantization", config_file, quantization.get("mode", "affine"))
    modules = dict(model.named_modules())
    for key, entry in quantization.items():
        if key not in modules:
            continue
        if isinstance(entry, dict):
            # a module's own setting is affine unless it says otherwise (mlx's to_quantized default)
            _check_setting(entry, f"quantization[{key!r}]", config_file, "affine")
        elif not isinstance(entry, bool):
            raise ValueError(f"{config_file}: quantization[{key!r}] must be an object or true/false, got {_SHOWN.repr(entry)}")


def _check_setting(entry: dict, name: str, config_file: Path, default_mode: str) -> None:
    mode = entry.get("mode", default_mode)
    if mode not in GROUP_SIZES:
        raise ValueError(f"{config_file}: {name}.mode must be one of {', '.join(GROUP_SIZES)}, got {_SHOWN.repr(mode)}")
    for field, allowed in (("bits", BITS[mode]), ("group_size", GROUP_SIZES[mode])):
        value = entry.get(field)
        if isinstance(value, bool) or value not in allowed:
            raise ValueError(
                f"{config_file}: {name}.{field} must be one of {', '.join(map(str, allowed))} for {mode}, "
                f"got {_SHOWN.repr(value)}"
            )


def _apply_quantization(model: nn.Module, quantization: dict, weights: dict) -> None:
    """Swap in quantized modules where the checkpoint has them, before loading."""

    def predicate(path, module):
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def check_weights(model: nn.Module, weights: dict, source: Path) -> None:
    """Strict loading: every parameter present, nothing extra, shapes equal."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing weight(s): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append(
            f"unexpected weight(s): {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else "")
        )
    for key in sorted(set(expected) & set(weights)):
        if expected[key].shape != weights[key].shape:
            problems.append(
                f"weight {key} has shape {tuple(weights[key].shape)} in the checkpoint, "
                f"the model expects {tuple(expected[key].shape)}"
            )
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


def _as_dtype(dtype) -> mx.Dtype:
    if isinstance(dtype, mx.Dtype):
        return dtype
    names = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def _cast_for_cpu_experts(model: nn.Module) -> None:
    """mlx's CPU backend runs gather_mm (unquantized experts) in float32 only."""
    if mx.default_device() != mx.cpu:
        return
    experts = [m for _, m in model.named_modules() if type(m) is SwitchLinear and m.weight.dtype != mx.float32]
    if experts:
        warnings.warn(
            f"casting the unquantized expert weights from {experts[0].weight.dtype} to float32: "
            "mlx's CPU backend multiplies experts in float32 only",
            stacklevel=3,
        )
        for m in experts:
            m.weight = m.weight.astype(mx.float32)


def load_model(
    path_or_repo: Union[str, Path], dtype=None, tensor_group: Optional[mx.distributed.Group] = None
) -> Model:
    """Build a strict-loaded model; weights keep the checkpoint's dtype unless
    `dtype` ("bfloat16", "float16", "float32" or an mx.Dtype) is given. With a
    `tensor_group` (under `mlx.launch`: mx.distributed.init()) the model is
    sharded across it (`Model.shard`): each rank reads whole tensors, layer
    by layer, and keeps only its share."""
    path = resolve(path_or_repo)
    config = load_config(path)
    try:
        args = ModelArgs.from_dict(config)
        model = Model(args)  # initialize_rope checks the rope parameters' keys it uses
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from None
    generation_config = load_generation_config(path, args)  # checked before any weight is read
    checkpoint = load_safetensors(path)
    weights = model.sanitize(checkpoint)
    vision = load_vision(path, config, checkpoint, args, dtype)
    del checkpoint
    quantization = quantization_of(config)
    if quantization is not None:
        check_quantization(quantization, path / "config.json", model)
        _apply_quantization(model, quantization, weights)
    if dtype is not None:
        dtype = _as_dtype(dtype)
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    check_weights(model, weights, path)
    model.update(tree_unflatten(list(weights.items())))
    if tensor_group is not None:
        # the model holds the only references to the lazily loaded tensors:
        # read layer by layer, a layer's whole tensors are freed once their
        # shares are copied out, so memory peaks at the shares plus one layer
        del weights
        model.shard(tensor_group)
        for layer in model.layers:
            mx.eval(layer.parameters())
    _cast_for_cpu_experts(model)
    model.generation_config = GenerationConfig(generation_config)
    mx.eval(model.parameters())
    if vision is not None:
        # after the eval: the tower's tensors stay lazy, read from the file at
        # the first image, so a model used for text never holds them
        model.attach_vision(vision)
    model.max_soft_tokens = image_token_budget(path)
    model.eval()
    return model


def load_vision(path: Path, config: dict, checkpoint: dict, args: ModelArgs, dtype=None) -> Optional[VisionModel]:
    """The vision tower and embedder with the checkpoint's weights (lazy, not
    read yet), or None for a checkpoint without vision weights (text only).
    Strict as the text model: a missing, extra or misshaped tensor, a bad
    `vision_config` or image token ids outside the vocabulary is one error
    naming the file."""
    weights = sanitize_vision(checkpoint)
    if not weights:
        return None
    try:
        with _random_state_kept():
            vision = VisionModel(VisionConfig.from_checkpoint_config(config))
        for name in IMAGE_TOKEN_FIELDS:
            args.check_token_ids(name, getattr(args, name))
    except ValueError as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from None
    if dtype is not None:
        weights = {k: v.astype(_as_dtype(dtype)) for k, v in weights.items()}
    try:
        load_vision_weights(vision, weights)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    vision.eval()
    return vision


@contextmanager
def _random_state_kept():
    """Building modules draws their initial weights from mx.random's global
    state. The tower's are replaced by the checkpoint's at once, and a model
    loaded with a tower must leave the state as mlx-lm's text-only loader
    does: `mlx_lm.generate --seed` seeds before it loads, and both must then
    draw the same. mx.random.seed(s) sets the key to s's high and low 32
    bits (pinned by tests/test_image_prompts.py)."""
    high, low = mx.random.state[0].tolist()
    try:
        yield
    finally:
        mx.random.seed((high << 32) | low)


def image_token_budget(path: Path) -> Optional[int]:
    """The checkpoint's processor's `max_soft_tokens` (processor_config.json's
    image processor, or preprocessor_config.json), or None: the reference's
    default then applies."""
    for name, section in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        file = path / name
        if not file.is_file():
            continue
        settings = _read_json(file)
        if section is not None:
            settings = settings.get(section)
        if isinstance(settings, dict) and settings.get("max_soft_tokens") is not None:
            value = settings["max_soft_tokens"]
            if isinstance(value, bool) or value not in SUPPORTED_SOFT_TOKENS:
                raise ValueError(
                    f"{file}: max_soft_tokens must be one of {', '.join(map(str, SUPPORTED_SOFT_TOKENS))}, "
                    f"got {_SHOWN.repr(value)}"
                )
            return value
    return None


def load_generation_config(path: Path, args: ModelArgs) -> dict:
    """generation_config.json's settings (nulls mean unset), or {} without one.
    Its eos ids are checked against the model's vocabulary here, where the
    message can name the file: generation stops on them."""
    file = path / "generation_config.json"
    if not file.is_file():
        return {}
    config = {k: v for k, v in _read_json(file).items() if v is not None}
    if "eos_token_id" in config:
        try:
            args.check_token_ids("eos_token_id", config["eos_token_id"])
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None
    return config


def _eos_token_ids(model: Model) -> list:
    """generation_config.json's eos ids, else config.json's, as a list."""
    eos = model.generation_config.get("eos_token_id", model.args.eos_token_id)
    return model.args.check_token_ids("eos_token_id", eos)


def load(
    path_or_repo: Union[str, Path],
    dtype=None,
    adapter_path: Optional[Union[str, Path]] = None,
    tensor_group: Optional[mx.distributed.Group] = None,
):
    """(model, tokenizer), the tokenizer in mlx-lm's TokenizerWrapper; LoRA
    adapters (as `python -m mlx_diffusiongemma.train --lora-rank` saves them,
    in mlx-lm's adapter format) are applied when `adapter_path` is given; the
    model is sharded across `tensor_group` when one is given (see `load_model`)."""
    if adapter_path is not None and tensor_group is not None:
        raise ValueError("LoRA adapters cannot be applied to a sharded model: pass adapter_path or tensor_group, not both")
    path = resolve(path_or_repo)
    model = load_model(path, dtype=dtype, tensor_group=tensor_group)
    if adapter_path is not None:
        load_adapters(model, str(adapter_path))
        model.eval()
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=_eos_token_ids(model))
    except Exception as e:  # transformers re-reads config.json, strictly typed, and raises its own types
        raise ValueError(f"{path}: cannot load the tokenizer: {' '.join(str(e).split())}") from None
    return model, tokenizer


def mlx_community_recipe(path: str, module: nn.Module):
    """The mlx-community recipe, in the form of mlx-lm's `quant_predicate`: a dict
    pins a module's setting (embeddings, attention, dense MLP and router: 8 bits
    group 64), True gives it the chosen one (experts, self-conditioning), False
    leaves it unquantized. mlx-lm writes a config entry for each dict and none
    for True; `quantization_plan` writes the same."""
    if not hasattr(module, "to_quantized") or path.startswith(tuple(p.rstrip(".") for p in VISION_PREFIXES)):
        return False  # the vision tower stays as the checkpoint has it (4304 is not a multiple of 64)
    if path.endswith(_EIGHT_BIT_SUFFIXES) or any(part in path for part in _EIGHT_BIT_PARTS):
        return {"group_size": 64, "bits": 8}
    return ".experts." in path or ".self_conditioning." in path


RECIPES = {"mlx-community": mlx_community_recipe}
GROUP_SIZES = {"affine": (32, 64, 128), "mxfp4": (32,), "mxfp8": (32,), "nvfp4": (16,)}  # what mx.quantize takes
BITS = {"affine": (2, 3, 4, 5, 6, 8), "mxfp4": (4,), "mxfp8": (8,), "nvfp4": (4,)}


def quantization_plan(
    model: Model, bits: int = 4, group_size: int = 64, mode: str = "affine", recipe: str = "mlx-community"
):
    """What `quantize` does, decided without touching a weight: the `to_quantized`
    settings of each module the recipe quantizes, and the config's `quantization`
    entries (the chosen setting, then every pinned module, as mlx-lm writes them).
    `convert` streams with the same plan, so both write the same checkpoint."""
    if mode not in GROUP_SIZES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(GROUP_SIZES)}")
    if mode != "affine":
        (group_size,) = GROUP_SIZES[mode]
    elif group_size not in GROUP_SIZES[mode]:
        raise ValueError(f"affine group size must be one of {', '.join(map(str, GROUP_SIZES[mode]))}, got {group_size!r}")
    chosen = {"group_size": group_size, "bits": bits, "mode": mode}
    choose = RECIPES[recipe]
    plan, pinned, misfits = {}, {}, []
    for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        choice = choose(path, module)
        if choice is True:
            plan[path] = dict(chosen)
        elif choice:
            plan[path] = pinned[path] = choice
        if choice and module.weight.shape[-1] % plan[path]["group_size"]:
            misfits.append(path)
    if misfits:
        raise ValueError(_misfit_message(model, misfits, plan, pinned, recipe))
    return plan, {**chosen, **pinned}


def _misfit_message(model: Model, misfits: list, plan: dict, pinned: dict, recipe: str) -> str:
    """Quantization groups run along a weight's input dimension, which must be a
    multiple of the group size: said before anything is written, rather than by
    mx.quantize halfway through a conversion."""
    path = misfits[0]
    dim = dict(model.named_modules())[path].weight.shape[-1]
    entry = plan[path]
    head = (
        f"cannot quantize {path}.weight"
        + (f" (and {len(misfits) - 1} more weight(s))" if len(misfits) > 1 else "")
        + f": its input dimension {dim} is not a multiple of group size {entry['group_size']}"
    )
    if path in pinned:
        return f"{head}; the {recipe} recipe pins it at {entry['bits']} bits group size {entry['group_size']}, and no option changes that"
    mode = entry["mode"]
    fits = [str(g) for g in GROUP_SIZES[mode] if dim % g == 0]
    if fits:
        return f"{head}; {mode} group sizes that fit it: {', '.join(fits)}"
    return f"{head}, and no {mode} group size ({', '.join(map(str, GROUP_SIZES[mode]))}) fits it"


def quantize(
    model: Model, bits: int = 4, group_size: int = 64, mode: str = "affine", recipe: str = "mlx-community"
) -> dict:
    """Quantize in place with the mlx-community recipe; returns the config's
    `quantization` entries: the chosen setting plus an entry for each module the
    recipe pins. mxfp4/mxfp8 use group 32 and nvfp4 group 16, as they must."""
    plan, config = quantization_plan(model, bits, group_size, mode, recipe)
    nn.quantize(
        model,
        group_size=config["group_size"],
        bits=bits,
        mode=mode,
        class_predicate=lambda path, _: plan.get(path, False),
    )
    return config


# What mlx-lm and mlx-vlm read besides the weights and config.json.
COMPANION_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
)


def copy_companions(source: Path, directory: Path) -> list:
    """Copy the companion files `source` has into `directory`; their names."""
    copied = [name for name in COMPANION_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copyfile(source / name, directory / name)
    return copied


def write_model(model: Model, directory: Path, config: dict) -> None:
    """Weights (sharded, with index) and config.json, into an existing directory."""
    save_weights(directory, model)
    save_config(dict(config), directory / "config.json", keep_vision_config=True)


def save_model(model: Model, path: Union[str, Path], config: dict) -> Path:
    """Write weights and config.json into a fresh directory, atomically (see
    `staging.staged`); a non-empty `path` is refused, up front and, should
    one appear during the write, at the swap. Another writer to `path`
    (`staging.claimed`) is refused."""
    path = Path(path)
    with claimed(path):
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"{path} exists and is not empty; refusing to overwrite it")
        with staged(path, replace=False) as staging:
            write_model(model, staging, config)
    return path
