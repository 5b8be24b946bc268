"""DiffusionGemma (block-diffusion Gemma 4) on MLX."""

from .generate import DiffusionResponse, diffusion_generate, stream_diffusion_generate
from .load import load, load_model, quantize, save_model
from .model import Model, ModelArgs
from .sampling import Randomness

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
