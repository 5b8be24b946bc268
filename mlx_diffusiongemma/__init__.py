"""DiffusionGemma (block-diffusion Gemma 4) on MLX."""

from .load import load, load_model, quantize, save_model
from .model import Model, ModelArgs

# Imported on first use (from the generate package's face, generate/__init__.py):
# a command that does not generate (convert, train) imports neither the loop,
# the sampler nor the kernels.
_LAZY = {
    "DiffusionResponse": "generate",
    "diffusion_generate": "generate",
    "stream_diffusion_generate": "generate",
    "Randomness": "sampling",
}


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
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
