"""DiffusionGemma (block-diffusion Gemma 4) on MLX."""

from .load import load, load_model, quantize, save_model
from .model import Model, ModelArgs
from .sampling import Randomness

_GENERATE = ("DiffusionResponse", "diffusion_generate", "stream_diffusion_generate")


def __getattr__(name):
    # Imported on first use, so `python -m mlx_diffusiongemma.generate` runs a
    # module that the package import has not already loaded.
    if name in _GENERATE:
        from . import generate

        return getattr(generate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DiffusionResponse",
    "Model",
    "ModelArgs",
    "Randomness",
    "diffusion_generate",
    "load",
    "load_model",
    "quantize",
    "save_model",
    "stream_diffusion_generate",
]
