"""The sampler's options: `DiffusionOptions`, their defaults (the
reference's), where they come from (a checkpoint's generation_config.json,
then the caller) and their checks."""

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import numpy as np

from ..config import check_range, token_ids
from ..sampling import ConfidenceAcceptance, EntropyBoundAcceptance

ACCEPTANCE = ("entropy_bound", "confidence")
SELF_CONDITIONING = ("exact", "top-k")


@dataclass(frozen=True)
class DiffusionOptions:
    """Sampler settings. Defaults are the reference's; a checkpoint's
    generation_config.json overrides them, and keyword arguments override both."""

    max_tokens: int = 256
    max_denoising_steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_id: tuple = ()  # empty: generate whole canvases until max_tokens
    pad_token_id: Optional[int] = None  # None: tokens_per_forward counts every generated token
    acceptance: str = "entropy_bound"  # or "confidence"
    min_confidence: float = 0.9  # for acceptance="confidence"
    self_conditioning: str = "exact"  # or "top-k": the k most probable tokens' embeddings only
    # 64: k >= 4 matched exact on all 400 study runs (V 260); 64 keeps a margin at 1/3 the dense cost (V 262144)
    self_conditioning_k: int = 64  # for self_conditioning="top-k"
    # on a GPU, the fused sampler kernel (checked against the MLX path first); False forces the MLX path
    fused_sampling: bool = True

    @classmethod
    def resolve(cls, model, tokenizer, overrides: dict) -> "DiffusionOptions":
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(unknown)}")
        values = _from_generation_config(getattr(model, "generation_config", {}))
        if "eos_token_id" not in values and tokenizer is not None:
            values["eos_token_id"] = sorted(tokenizer.eos_token_ids)
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["eos_token_id"] = tuple(token_ids(values.get("eos_token_id", ())))  # check_token_ids names a bad one
        options = cls(**values)
        cls.check(asdict(options))
        options.check_token_ids(model.args.vocab_size)
        return options

    @staticmethod
    def check(values: dict) -> None:
        """The rules that need no model, for the options `values` holds (a
        partial dict too): the CLI applies them to its flags before loading."""

        def integer(name, low):
            if name in values:  # mlx counts steps and tokens in int32
                check_range(name, values[name], low, 2**31, integer=True, expected=f"an integer >= {low}",
                            beyond="an integer below 2**31")

        def number(name, positive):
            if name not in values:
                return
            value = values[name]
            check_range(name, value, 0, low_inclusive=not positive, expected=f"a number {'> 0' if positive else '>= 0'}")
            if not ((0 < _float32(value) if positive else True) and _float32(value) < math.inf):
                raise ValueError(f"{name} must be a number float32 holds (the sampler computes in float32), got {value!r}")

        integer("max_tokens", 1)
        integer("max_denoising_steps", 1)
        integer("stability_threshold", 0)
        number("t_min", positive=False)
        number("t_max", positive=False)
        if "t_min" in values and "t_max" in values and _float32(values["t_max"]) <= _float32(values["t_min"]):
            in_float32 = " in float32 (the sampler computes in float32)" if values["t_max"] > values["t_min"] else ""
            raise ValueError(
                f"t_max must be greater than t_min{in_float32}, got t_max={values['t_max']} and t_min={values['t_min']}"
            )
        number("entropy_bound", positive=True)
        number("confidence_threshold", positive=True)
        if values.get("acceptance", ACCEPTANCE[0]) not in ACCEPTANCE:
            raise ValueError(f"acceptance must be one of {sorted(ACCEPTANCE)}, got {values['acceptance']!r}")
        if "min_confidence" in values:
            in_range = dict(low_inclusive=False, high_inclusive=True, expected="in (0, 1]")
            check_range("min_confidence", values["min_confidence"], 0, 1, **in_range)
            check_range("min_confidence", _float32(values["min_confidence"]), 0, 1, **in_range)
        if values.get("self_conditioning", SELF_CONDITIONING[0]) not in SELF_CONDITIONING:
            raise ValueError(
                f"self_conditioning must be one of {sorted(SELF_CONDITIONING)}, got {values['self_conditioning']!r}"
            )
        integer("self_conditioning_k", 1)
        if not isinstance(values.get("fused_sampling", True), bool):
            raise ValueError(f"fused_sampling must be True or False, got {values['fused_sampling']!r}")

    def check_token_ids(self, vocab_size: int) -> None:
        """The rules that need the model's vocabulary."""
        pad = () if self.pad_token_id is None else (self.pad_token_id,)
        for name, ids in (("eos_token_id", self.eos_token_id), ("pad_token_id", pad)):
            for token in ids:
                if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < vocab_size:
                    raise ValueError(f"{name} must hold token ids in [0, {vocab_size}), got {getattr(self, name)!r}")

    def make_acceptance(self):
        if self.acceptance == "confidence":
            return ConfidenceAcceptance(self.min_confidence)
        return EntropyBoundAcceptance(self.entropy_bound)


def _float32(value) -> float:
    """A number as the sampler holds it: rounded to float32 (inf past its range)."""
    try:
        value = float(value)
    except OverflowError:  # an int past float64's range
        return math.inf if value > 0 else -math.inf
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def _from_generation_config(config) -> dict:
    """Options a generation_config.json sets (nulls mean unset)."""
    names = {f.name for f in fields(DiffusionOptions)} | {"max_new_tokens", "sampler_config"}
    values = {k: v for k, v in config.items() if k in names and v is not None}
    if "max_new_tokens" in values:
        values["max_tokens"] = values.pop("max_new_tokens")
    sampler = values.pop("sampler_config", None)
    if isinstance(sampler, dict) and sampler.get("entropy_bound") is not None:
        values["entropy_bound"] = sampler["entropy_bound"]
    return values
