"""Lets mlx-lm load DiffusionGemma without a change to mlx-lm.

mlx-lm imports `mlx_lm.models.<model_type>`; this finder answers for
`mlx_lm.models.diffusion_gemma` only, with the names of
`mlx_diffusiongemma.mlx_lm_model`. `mlx_diffusiongemma.pth` imports it at
startup: it imports nothing itself and sits last on `sys.meta_path`, so a
process that never asks for that module is untouched, and a `diffusion_gemma`
module shipped by mlx-lm itself would win.
"""

import sys

MODULE = "mlx_lm.models.diffusion_gemma"
TARGET = "mlx_diffusiongemma.mlx_lm_model"


class DiffusionGemmaFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != MODULE:
            return None
        from importlib.util import spec_from_loader

        return spec_from_loader(fullname, cls)

    @staticmethod
    def create_module(spec):
        return None  # a plain module

    @staticmethod
    def exec_module(module):
        from importlib import import_module

        target = import_module(TARGET)
        module.__dict__.update({name: getattr(target, name) for name in target.__all__})


if not any(finder is DiffusionGemmaFinder for finder in sys.meta_path):
    sys.meta_path.append(DiffusionGemmaFinder)
