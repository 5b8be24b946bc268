"""Image preprocessing for the vision tower (`vision.py`), exact against
transformers' `Gemma4ImageProcessorPil` (the PIL backend of
`Gemma4ImageProcessor`) and its `load_image` for paths.

Own lines on Pillow and numpy, not transformers' processor: transformers is a
test-only dependency here (and a ~3 s import), and its processor mishandles
float arrays (rescales [0, 1] by 1/255 again) and rejects 2-D arrays.

What the reference does, step by step:

- RGB. A path is opened, EXIF-transposed and `convert("RGB")`'d: an alpha
  channel is dropped, not composited. A PIL image with an alpha band or a
  `transparency` entry (palette, "LA", "RGBA", ...) is alpha-composited onto
  white with Pillow; any other PIL image is `convert("RGB")`'d (no EXIF
  transpose). An HxWx4 uint8 array is composited onto white in numpy,
  `round(a/255 * rgb + (1 - a/255) * 255)` (the same bytes as Pillow's, over
  all 256 x 256 value/alpha pairs). An HxW array is grey (the reference
  rejects it). Float arrays in [0, 1] are taken to 8 bits here first
  (`round(x * 255)`), then treated as uint8 arrays.
- Resize, only when the size changes: Pillow's bicubic on the 8-bit RGB image,
  to the largest size keeping the aspect ratio with at most
  `max_soft_tokens * pooling_kernel_size**2` patches of `patch_size` pixels and
  sides that are multiples of `pooling_kernel_size * patch_size` (a side that
  would round to 0 gets one multiple, the other `floor(long / short)`
  multiples, capped at `max_soft_tokens` multiples). Small images are enlarged.
- Scale by 1/255 (in float64, then float32); no normalisation.
- Patches in (row, column, channel) order, row-major over the patch grid, with
  (x, y) = (column, row) positions; every image is padded with zero patches and
  (-1, -1) positions to `max_soft_tokens * pooling_kernel_size**2` patches
  (always that many, whatever the batch). An image has
  `patches // pooling_kernel_size**2` soft tokens.

Pillow is the `vision` extra: pip install 'mlx-diffusiongemma[vision]'.
"""

import math
import os
from pathlib import Path

import numpy as np

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
_EXTRA = "pip install 'mlx-diffusiongemma[vision]'"


def _pil():
    try:
        import PIL.Image
        import PIL.ImageOps
    except ImportError:
        raise ImportError(f"images need Pillow: {_EXTRA}") from None
    return PIL


def _one_line(error) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _open_path(path):
    PIL = _pil()
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ValueError(f"image file not found: {name}")
    try:
        with PIL.Image.open(name) as image:
            image.load()
            image = PIL.ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except Exception as error:  # Pillow raises many kinds for a bad file
        raise ValueError(f"cannot read image {name}: {_one_line(error)}") from None


def _from_pil(image):
    PIL = _pil()
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def _from_array(array: np.ndarray):
    PIL = _pil()
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"an image array must be HxW, HxWx3 or HxWx4, got shape {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"an image array must not be empty, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
            raise ValueError("a float image array must hold values in [0, 1]")
        array = np.round(array.astype(np.float64) * 255).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        if array.dtype == np.bool_:
            array = array.astype(np.uint8) * 255
        elif array.min() < 0 or array.max() > 255:
            raise ValueError("an integer image array must hold values in [0, 255]")
        array = array.astype(np.uint8)
    else:
        raise ValueError(f"unsupported image array dtype {array.dtype}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:
        alpha = array[..., 3:4] / 255
        array = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return PIL.Image.fromarray(np.ascontiguousarray(array))


def load_image(source):
    """An 8-bit RGB PIL image from a path (str or Path), a PIL image, or a
    numpy array (HxW, HxWx3, HxWx4; uint8, or float in [0, 1]), converted as
    the reference converts that form (see the module docstring). A missing,
    corrupt or unreadable file is one ValueError naming it."""
    PIL = _pil()
    if isinstance(source, (str, Path)):
        return _open_path(source)
    if isinstance(source, PIL.Image.Image):
        return _from_pil(source)
    if isinstance(source, np.ndarray):
        return _from_array(source)
    raise ValueError(
        "an image must be a path, a PIL image or a numpy array, "
        f"got {type(source).__name__}"
    )


def target_size(
    height: int, width: int, patch_size: int, max_patches: int, pooling_kernel_size: int
) -> tuple[int, int]:
    """The reference's `get_aspect_ratio_preserving_size`: (height, width)."""
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    side = pooling_kernel_size * patch_size
    target_height = math.floor(factor * height / side) * side
    target_width = math.floor(factor * width / side) * side
    if target_height == 0 and target_width == 0:
        raise ValueError(f"cannot resize a {height}x{width} image to at least {side}x{side}")
    max_side = (max_patches // pooling_kernel_size**2) * side
    if target_height == 0:
        target_height = side
        target_width = min(math.floor(width / height) * side, max_side)
    elif target_width == 0:
        target_width = side
        target_height = min(math.floor(height / width) * side, max_side)
    return target_height, target_width


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def preprocess(
    images, max_soft_tokens: int = 280, patch_size: int = 16, pooling_kernel_size: int = 3
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Images (one source or a list of them, each as `load_image` takes) to
    the vision tower's inputs: pixel_values float32 [n, max_patches,
    3 * patch_size**2], position_ids int32 [n, max_patches, 2] and each
    image's soft-token count, where max_patches = max_soft_tokens *
    pooling_kernel_size**2. Exact against the reference processor."""
    if max_soft_tokens not in SUPPORTED_SOFT_TOKENS or isinstance(max_soft_tokens, bool):
        raise ValueError(
            f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {max_soft_tokens!r}"
        )
    _positive_int("patch_size", patch_size)
    _positive_int("pooling_kernel_size", pooling_kernel_size)
    PIL = _pil()
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("preprocess needs at least one image")
    max_patches = max_soft_tokens * pooling_kernel_size**2
    n = len(images)
    pixel_values = np.zeros((n, max_patches, 3 * patch_size**2), np.float32)
    position_ids = np.full((n, max_patches, 2), -1, np.int32)
    counts = []
    for i, source in enumerate(images):
        image = load_image(source)
        height, width = image.height, image.width
        new_height, new_width = target_size(
            height, width, patch_size, max_patches, pooling_kernel_size
        )
        if (new_height, new_width) != (height, width):
            image = image.resize((new_width, new_height), resample=PIL.Image.BICUBIC)
        pixels = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)
        rows, cols = new_height // patch_size, new_width // patch_size
        patches = pixels.reshape(rows, patch_size, cols, patch_size, 3)
        patches = patches.transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
        pixel_values[i, : rows * cols] = patches
        grid_y, grid_x = np.divmod(np.arange(rows * cols), cols)
        position_ids[i, : rows * cols, 0] = grid_x
        position_ids[i, : rows * cols, 1] = grid_y
        counts.append(rows * cols // pooling_kernel_size**2)
    return pixel_values, position_ids, counts
