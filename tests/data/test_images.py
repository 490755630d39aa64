"""Image loading and the conversions that make any image acceptable to the Qwen processor."""

import pytest
from PIL import Image

from rematch_pl.data.images import load_image, make_processor_safe


def _rgba(colour, alpha, size=(40, 40)):
    return Image.new("RGBA", size, colour + (alpha,))


def test_rgb_unchanged():
    img = Image.new("RGB", (40, 50), (1, 2, 3))
    out = make_processor_safe(img)
    assert out.mode == "RGB" and out.size == (40, 50) and out.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("mode,value", [("L", 100), ("1", 1), ("I;16", 40000), ("F", 0.5)])
def test_grayscale_modes_to_rgb(mode, value):
    img = Image.new(mode, (40, 40), value)
    img.putpixel((0, 0), 0)  # give 16-bit / float images a range to rescale
    out = make_processor_safe(img)
    assert out.mode == "RGB" and out.size == (40, 40)
    r, g, b = out.getpixel((5, 5))
    assert r == g == b


def test_cmyk_to_rgb():
    out = make_processor_safe(Image.new("CMYK", (40, 40), (0, 255, 255, 0)))  # red in CMYK
    assert out.mode == "RGB"
    r, g, b = out.getpixel((3, 3))
    assert r > 200 and g < 50 and b < 50


def test_rgba_composited_on_white():
    img = _rgba((255, 0, 0), 0)
    img.putpixel((0, 0), (0, 0, 255, 255))
    out = make_processor_safe(img)
    assert out.mode == "RGB"
    assert out.getpixel((10, 10)) == (255, 255, 255)  # fully transparent -> white, not red or black
    assert out.getpixel((0, 0)) == (0, 0, 255)  # opaque pixels kept
    half = make_processor_safe(_rgba((0, 0, 0), 128))
    assert 120 <= half.getpixel((5, 5))[0] <= 135  # half-transparent black on white = mid grey


def test_la_composited_on_white():
    out = make_processor_safe(Image.new("LA", (40, 40), (0, 0)))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (255, 255, 255)


def test_palette_with_transparency():
    img = Image.new("P", (40, 40), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 1)
    img.info["transparency"] = 0  # colour 0 (red) is transparent
    out = make_processor_safe(img)
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 255, 0)


def test_palette_without_transparency():
    img = Image.new("P", (40, 40), 1)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    assert make_processor_safe(img).getpixel((5, 5)) == (0, 255, 0)


@pytest.mark.parametrize("size,expected", [((10, 40), (28, 112)), ((40, 7), (160, 28)), ((5, 5), (28, 28))])
def test_small_images_upsized_keeping_aspect(size, expected):
    assert make_processor_safe(Image.new("RGB", size)).size == expected


@pytest.mark.parametrize("size", [(1000, 2), (3, 5000), (10000, 28), (28, 5601)])
def test_extreme_aspect_ratio_resized_to_fit(size):
    out = make_processor_safe(Image.new("RGB", size))
    w, h = out.size
    assert min(w, h) >= 28 and max(w, h) / min(w, h) <= 200
    assert max(w, h) >= max(size)  # resized to fit, not cropped


def test_ratio_at_limit_untouched():
    assert make_processor_safe(Image.new("RGB", (5600, 28))).size == (5600, 28)


def test_safe_images_pass_the_processor(processor):
    images = [make_processor_safe(Image.new(m, s)) for m, s in
              [("RGBA", (10, 40)), ("CMYK", (3, 5000)), ("L", (64, 64)), ("P", (1, 1))]]
    batch = processor.process_images(images)
    assert batch.grid_thw.shape == (4, 3)
    assert batch.pixel_values.shape[0] == int(batch.grid_thw.prod(-1).sum())


def test_load_image(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (30, 30), (1, 2, 3)).save(path)
    assert load_image(path).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(OSError):
        load_image(bad)
    truncated = tmp_path / "trunc.png"
    Image.new("RGB", (200, 200), (9, 9, 9)).save(path)
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(OSError):
        load_image(truncated)
