"""`images.preprocess` against transformers' Gemma 4 image processor (its PIL
backend, `Gemma4ImageProcessorPil`, as a checkpoint's processor config builds
it), on images made here."""

import sys

import numpy as np
import pytest
from PIL import Image
from transformers.models.gemma4.image_processing_pil_gemma4 import (
    Gemma4ImageProcessorPil,
)

from mlx_diffusiongemma.images import SUPPORTED_SOFT_TOKENS, load_image, preprocess

_PROCESSORS = {}


def reference(images, max_soft_tokens=280):
    if max_soft_tokens not in _PROCESSORS:
        _PROCESSORS[max_soft_tokens] = Gemma4ImageProcessorPil(max_soft_tokens=max_soft_tokens)
    out = _PROCESSORS[max_soft_tokens](images)
    return out["pixel_values"], out["image_position_ids"], list(out["num_soft_tokens_per_image"])


def assert_same(ours, ref):
    pixels, positions, counts = ours
    ref_pixels, ref_positions, ref_counts = ref
    assert pixels.dtype == np.float32 and positions.dtype == np.int32
    assert pixels.shape == ref_pixels.shape and positions.shape == ref_positions.shape
    np.testing.assert_array_equal(pixels, ref_pixels)
    np.testing.assert_array_equal(positions, ref_positions)
    assert counts == ref_counts


def noise(height, width, channels=3, seed=0):
    shape = (height, width, channels) if channels else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def smooth(height, width, seed=0):
    """A gradient with noise: resizing it exercises the filter's arithmetic."""
    y, x = np.mgrid[:height, :width]
    base = (x * 255 // max(width - 1, 1) + y * 7) % 256
    image = np.stack([base, base[::-1], (base * 3) % 256], -1).astype(np.int64)
    image += np.random.default_rng(seed).integers(-20, 21, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def rgba(height=45, width=70, seed=1):
    image = noise(height, width, 4, seed)
    image[:10, :, 3] = 0  # fully transparent rows
    image[10:20, :, 3] = 255  # opaque rows
    return image


@pytest.mark.parametrize("max_soft_tokens", SUPPORTED_SOFT_TOKENS)
def test_each_budget(max_soft_tokens):
    image = Image.fromarray(smooth(300, 451, seed=max_soft_tokens))
    assert_same(preprocess(image, max_soft_tokens), reference(image, max_soft_tokens))


@pytest.mark.parametrize(
    "height, width",
    [(37, 501), (501, 37), (17, 640), (640, 17), (1, 1), (1, 2000), (768, 768), (48, 48), (3000, 4000)],
)
def test_sizes(height, width):
    image = Image.fromarray(noise(height, width, seed=height + width))
    ours = preprocess(image)
    assert_same(ours, reference(image))
    assert ours[2][0] <= 280


def test_batch_pads_every_image_to_the_budget():
    images = [Image.fromarray(smooth(200, 300)), Image.fromarray(smooth(20, 700, 1)), Image.fromarray(smooth(5, 5, 2))]
    ours = preprocess(images, max_soft_tokens=70)
    assert_same(ours, reference(images, 70))
    assert ours[0].shape == (3, 630, 768)
    for count, positions in zip(ours[2], ours[1]):
        real = count * 9
        assert (positions[real:] == -1).all() and (positions[:real] >= 0).all()


@pytest.mark.parametrize("mode", ["L", "P", "LA", "CMYK", "I;16", "1"])
def test_pil_modes(mode):
    base = Image.fromarray(smooth(50, 83))
    if mode == "P":
        image = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    elif mode == "LA":
        image = Image.fromarray(rgba(50, 83)).convert("LA")
    elif mode == "I;16":
        image = Image.fromarray(smooth(50, 83)[..., 0].astype(np.uint16) * 257)
        assert image.mode.startswith("I;16")
    else:
        image = base.convert(mode)
    assert_same(preprocess(image), reference(image))


def test_palette_with_transparency_is_composited():
    image = Image.fromarray(smooth(40, 60)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 3
    ours = preprocess(image)
    assert_same(ours, reference(image))
    opaque = image.copy()
    del opaque.info["transparency"]
    assert not np.array_equal(ours[0], preprocess(opaque)[0])


def test_rgba_path_drops_alpha_and_pil_composites(tmp_path):
    array = rgba()
    path = tmp_path / "rgba.png"
    Image.fromarray(array).save(path)
    pil = Image.fromarray(array)
    from_path, from_pil, from_array = preprocess(str(path)), preprocess(pil), preprocess(array)
    assert_same(from_path, reference(str(path)))
    assert_same(preprocess(path), from_path)  # a pathlib.Path too
    assert_same(from_pil, reference(pil))
    assert_same(from_array, reference(array))
    assert not np.array_equal(from_path[0], from_pil[0])
    # Transparent rows come out white when composited, and keep their colour when dropped.
    assert (np.asarray(load_image(pil))[:10] == 255).all()
    np.testing.assert_array_equal(np.asarray(load_image(path)), array[..., :3])


def test_path_is_exif_transposed(tmp_path):
    image = Image.fromarray(smooth(30, 90))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    ours = preprocess(str(path))
    assert_same(ours, reference(str(path)))
    assert load_image(path).size == (30, 90)


def test_arrays():
    gray = noise(40, 90, channels=0)
    assert_same(preprocess(gray), reference(Image.fromarray(gray)))  # the reference rejects 2-D arrays
    rgb = noise(40, 90)
    assert_same(preprocess(rgb), reference(rgb))
    assert_same(preprocess(noise(40, 90, 1)), reference(noise(40, 90, 1)))
    # Floats in [0, 1] are taken to 8 bits first (the reference would rescale them twice).
    values = np.random.default_rng(5).random((40, 90, 4))
    values[..., 3] = np.where(values[..., 3] < 0.3, 0.0, values[..., 3])
    as_bytes = np.round(values * 255).astype(np.uint8)
    assert_same(preprocess(values), reference(as_bytes))
    assert_same(preprocess(values.astype(np.float32)[..., :3]), reference(as_bytes[..., :3]))


def test_bad_files_are_one_line_value_errors(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2000))
    truncated = tmp_path / "truncated.png"
    Image.fromarray(noise(64, 64)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    for path in (corrupt, truncated, tmp_path / "missing.png", tmp_path):
        with pytest.raises(ValueError) as error:
            preprocess([np.zeros((4, 4, 3), np.uint8), str(path)])
        message = str(error.value)
        assert str(path) in message and "\n" not in message


def test_bad_arguments():
    image = noise(10, 10)
    for value in (0, 100, 281, 2240, True):
        with pytest.raises(ValueError, match=f"max_soft_tokens.*{value}"):
            preprocess(image, max_soft_tokens=value)
    with pytest.raises(ValueError, match="patch_size"):
        preprocess(image, patch_size=0)
    with pytest.raises(ValueError, match="at least one"):
        preprocess([])
    for bad in (np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4, 3), np.uint8), np.full((4, 4, 3), 1.5), 42):
        with pytest.raises(ValueError):
            load_image(bad)


def test_without_pillow(monkeypatch):
    for name in [name for name in sys.modules if name == "PIL" or name.startswith("PIL.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"pip install 'mlx-diffusiongemma\[vision\]'"):
        preprocess(np.zeros((4, 4, 3), np.uint8))
