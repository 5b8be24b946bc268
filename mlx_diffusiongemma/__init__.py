"""DiffusionGemma (block-diffusion Gemma 4) on MLX."""

from .load import load, load_model, quantize, save_model
from .model import Model, ModelArgs

__all__ = ["Model", "ModelArgs", "load", "load_model", "quantize", "save_model"]
