"""Block-diffusion generation, transformers' `DiffusionGemmaGenerationMixin.generate`
step for step and draw for draw: the options (options.py), the events it
streams (events.py) and the loop (loop.py). `python -m mlx_diffusiongemma.generate`
runs the command (command.py, through __main__.py; this imports neither)."""

from .events import Commit, DiffusionResponse, Draft
from .loop import denoise_canvas, diffusion_generate, filter_rows, prefill, stream_diffusion_generate
from .options import ACCEPTANCE, SELF_CONDITIONING, DiffusionOptions

__all__ = [
    "ACCEPTANCE",
    "SELF_CONDITIONING",
    "Commit",
    "DiffusionOptions",
    "DiffusionResponse",
    "Draft",
    "denoise_canvas",
    "diffusion_generate",
    "filter_rows",
    "prefill",
    "stream_diffusion_generate",
]
