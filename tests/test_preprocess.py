"""Image loading/preprocessing: every mode -> RGB with the right colours, EXIF, aspect, bad files."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from earlyfusion.core.errors import UserError
from earlyfusion.tokenizer.preprocess import ImageError, image_grid, load_image, preprocess, resize_center_crop, to_pil


def png_bytes(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG", **kw)
    return b.getvalue()


def craft_png(width: int, height: int, bit_depth: int = 1, colour_type: int = 0, idat: bytes | None = None) -> bytes:
    """A tiny PNG file whose header claims ``width`` x ``height`` (a decompression bomb when huge)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", idat if idat is not None else zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))


def px(img: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    assert img.mode == "RGB"
    return img.getpixel(xy)


def close(a, b, tol=3) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


# ---------------------------------------------------------------- modes


def test_rgba_transparent_composited_on_white(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[0, 0] = (0, 0, 0, 0)          # fully transparent black -> white
    a[0, 1] = (255, 0, 0, 255)      # opaque red
    a[0, 2] = (255, 0, 0, 128)      # half-transparent red -> pink
    path = tmp_path / "x.png"
    Image.fromarray(a, "RGBA").save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (4, 4)
    assert px(img, (0, 0)) == (255, 255, 255)
    assert px(img, (1, 0)) == (255, 0, 0)
    assert close(px(img, (2, 0)), (255, 127, 127), tol=2)


def test_la_and_palette_transparency():
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA")
    img = load_image(png_bytes(la))
    assert px(img, (0, 0)) == (255, 255, 255) and px(img, (1, 0)) == (0, 0, 0)

    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    for fmt in ("PNG", "GIF"):
        b = io.BytesIO()
        p.save(b, fmt, transparency=0)
        img = load_image(b.getvalue())
        assert px(img, (0, 0)) == (255, 255, 255), fmt  # transparent index -> white
        assert px(img, (1, 0)) == (0, 255, 0), fmt
    # a palette image without transparency keeps its colours
    assert px(load_image(png_bytes(p)), (0, 0)) == (0, 0, 255)


def test_rgb_png_with_transparency_key():
    im = Image.new("RGB", (2, 1), (10, 20, 30))
    im.putpixel((1, 0), (200, 0, 0))
    img = load_image(png_bytes(im, transparency=(10, 20, 30)))
    assert px(img, (0, 0)) == (255, 255, 255) and px(img, (1, 0)) == (200, 0, 0)


def test_grey_and_bilevel():
    assert px(load_image(png_bytes(Image.new("L", (3, 3), 77)))) == (77, 77, 77)
    one = Image.new("1", (2, 1), 0)
    one.putpixel((1, 0), 1)
    img = load_image(png_bytes(one))
    assert px(img, (0, 0)) == (0, 0, 0) and px(img, (1, 0)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    r, g, b = px(load_image(path), (8, 8))
    assert r > 230 and g < 25 and b < 25


def test_sixteen_bit_png(tmp_path):
    a = np.array([[0, 32896, 65535]], np.uint16)
    path = tmp_path / "16.png"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode.startswith("I")
    img = load_image(path)
    assert [px(img, (i, 0)) for i in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_int32_and_float_modes():
    i32 = Image.fromarray(np.array([[0, 65535]], np.int32), "I")
    assert [px(load_image(i32), (i, 0)) for i in range(2)] == [(0, 0, 0), (255, 255, 255)]
    small = Image.fromarray(np.array([[0, 200]], np.int32), "I")  # already 8-bit range: kept
    assert px(load_image(small), (1, 0)) == (200, 200, 200)
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")  # [0, 1] floats
    assert [px(load_image(f), (i, 0))[0] for i in range(3)] == [0, 128, 255]
    nan = Image.fromarray(np.array([[np.nan, 1.0]], np.float32), "F")
    assert px(load_image(nan), (0, 0)) == (0, 0, 0)


def test_exif_orientation(tmp_path):
    # 40 wide x 20 high: left half red, right half blue; orientation 6 = rotate 90 degrees clockwise to view.
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    Image.fromarray(a).save(path, exif=exif, quality=95)
    img = load_image(path)
    assert img.size == (20, 40)  # upright: portrait
    top, bottom = px(img, (10, 5)), px(img, (10, 35))
    assert top[0] > 200 and top[2] < 60, top       # red went to the top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    exif[0x0112] = 3  # 180 degrees: red on the right
    Image.fromarray(a).save(path, exif=exif, quality=95)
    img = load_image(path)
    assert img.size == (40, 20) and px(img, (35, 10))[0] > 200


# ---------------------------------------------------------------- geometry


def test_resize_center_crop_aspect():
    a = np.zeros((32, 128, 3), np.uint8)  # wide: red | blue | blue | green
    a[:, :32] = (255, 0, 0)
    a[:, 32:96] = (0, 0, 255)
    a[:, 96:] = (0, 255, 0)
    out = resize_center_crop(Image.fromarray(a), 16)
    assert out.size == (16, 16)
    assert np.all(np.asarray(out) == (0, 0, 255))  # only the centre survives
    tall = resize_center_crop(Image.new("RGB", (7, 50), (9, 9, 9)), 24)
    assert tall.size == (24, 24) and px(tall, (12, 12)) == (9, 9, 9)
    tiny = resize_center_crop(Image.new("RGB", (1, 1), (1, 2, 3)), 8)  # upscaling works too
    assert tiny.size == (8, 8) and px(tiny, (4, 4)) == (1, 2, 3)


def test_same_size_is_pixel_exact_and_round_trips():
    a = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    t = preprocess(Image.fromarray(a), 16)
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    assert np.array_equal(np.asarray(to_pil(t)), a)


def test_to_pil_clips_and_checks_shape():
    img = to_pil(torch.tensor([[[5.0]], [[-5.0]], [[0.0]]]))
    assert px(img) == (255, 0, 128)
    with pytest.raises(ValueError):
        to_pil(torch.zeros(1, 4, 4))


def test_image_grid():
    ims = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(5)]
    g = image_grid(ims, ncols=3, pad=2)
    assert g.size == (2 + 3 * 10, 2 + 2 * 10)
    assert px(g, (0, 0)) == (255, 255, 255)
    assert px(g, (2 + 10 + 4, 2 + 10 + 4)) == (160, 0, 0)  # 5th image, row 1 col 1
    with pytest.raises(ValueError):
        image_grid([], 2)


# ---------------------------------------------------------------- big images and bad files


def test_big_image_is_fast():
    data = png_bytes(Image.new("L", (4000, 4000), 200))  # a 16 MP photo's size: legal
    t0 = time.perf_counter()
    t = preprocess(data, 32)
    assert time.perf_counter() - t0 < 5.0
    assert t.shape == (3, 32, 32) and torch.allclose(t, torch.full_like(t, 200 / 127.5 - 1))


def test_pixels_capped_at_what_a_tokenizer_could_use():
    """A 13000 x 13000 PNG (169 M pixels, under Pillow's own cap) is refused from its header, not decoded."""
    t0 = time.perf_counter()
    with pytest.raises(ImageError) as e:
        load_image(craft_png(13000, 13000))
    assert e.value.reason == "too_large" and time.perf_counter() - t0 < 1.0
    with pytest.raises(ImageError) as e:
        load_image(png_bytes(Image.new("L", (4097, 4096), 0)))
    assert e.value.reason == "too_large"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.mark.parametrize("interlace", [0, 1])
def test_png_with_fewer_rows_than_declared_is_truncated(interlace):
    """A complete zlib stream holding only 10 of 64 rows: Pillow fills the rest black; we call it truncated."""
    w, h = 32, 64
    rows = b"".join(b"\x00" + bytes([200]) * (w * 3) for _ in range(10))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, interlace)
    short = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")
    with pytest.raises(ImageError) as e:
        load_image(short)
    assert e.value.reason == "truncated"
    # the same image with every row, interlaced or not, in one IDAT or split over several, loads
    a = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    for kw in ({}, {"optimize": True}):
        img = load_image(png_bytes(Image.fromarray(a), **kw))
        assert np.array_equal(np.asarray(img), a)
    full = b"".join(b"\x00" + a[r].tobytes() for r in range(h))
    z = zlib.compress(full)
    split = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
             + _chunk(b"IDAT", z[:50]) + _chunk(b"IDAT", z[50:]) + _chunk(b"IEND", b""))
    assert np.array_equal(np.asarray(load_image(split)), a)
    for mode in ("1", "L", "P", "LA", "RGBA", "I;16"):
        small = Image.new(mode, (13, 7))
        load_image(png_bytes(small))
        load_image(png_bytes(small, interlace=1) if mode != "I;16" else png_bytes(small))


def test_only_raster_formats_are_opened(tmp_path, monkeypatch):
    """A PostScript file named .png never reaches Ghostscript: it is not an image, whatever is on PATH."""
    fake_gs = tmp_path / "bin" / "gs"
    fake_gs.parent.mkdir()
    marker = tmp_path / "gs-ran"
    fake_gs.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake_gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_gs.parent}:" + __import__("os").environ["PATH"])
    eps = tmp_path / "photo.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n")
    with pytest.raises(ImageError) as e:
        load_image(eps)
    assert e.value.reason == "not_an_image"
    assert not marker.exists()
    from earlyfusion.tokenizer.preprocess import is_image_file

    assert is_image_file("a.JPG") and is_image_file("b.webp") and not is_image_file("c.eps") and not is_image_file("d.pdf")


def test_big_jpeg_uses_draft(tmp_path):
    path = tmp_path / "big.jpg"
    a = np.zeros((1200, 2400, 3), np.uint8)
    a[:, 1200:] = (0, 200, 0)
    Image.fromarray(a).save(path, quality=90)
    img = load_image(path, shrink_to=100)
    assert 100 <= min(img.size) < 300  # decoded at reduced scale
    assert abs(img.size[0] / img.size[1] - 2.0) < 0.05


def test_decompression_bomb_refused_before_decoding(tmp_path):
    bomb = craft_png(30000, 30000)  # 900 M pixels in ~100 bytes
    assert len(bomb) < 200
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    t0 = time.perf_counter()
    with pytest.raises(ImageError) as e:
        load_image(path)
    assert e.value.reason == "too_large" and "bomb.png" in str(e.value)
    assert time.perf_counter() - t0 < 1.0
    # a bomb below PIL's limit: our own header check
    with pytest.raises(ImageError) as e:
        load_image(craft_png(15000, 12000))
    assert e.value.reason == "too_large"
    with pytest.raises(ImageError) as e:
        preprocess(png_bytes(Image.new("RGB", (100, 100))), 16, max_pixels=5000)
    assert e.value.reason == "too_large"


def test_bad_files_each_have_a_reason(tmp_path):
    good = png_bytes(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    cases = {
        "missing": tmp_path / "nope.png",
        "empty_file": tmp_path / "empty.png",
        "not_an_image": tmp_path / "text.png",
        "truncated": tmp_path / "trunc.png",
    }
    cases["empty_file"].write_bytes(b"")
    cases["not_an_image"].write_text("hello, I am not a picture\n")
    cases["truncated"].write_bytes(good[: len(good) // 2])
    for reason, path in cases.items():
        with pytest.raises(ImageError) as e:
            load_image(path)
        assert e.value.reason == reason, (reason, str(e.value))
        assert isinstance(e.value, UserError) and path.name in str(e.value)
    jpg = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(jpg, "JPEG")
    with pytest.raises(ImageError) as e:
        load_image(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    assert e.value.reason == "truncated"
    with pytest.raises(ImageError) as e:
        load_image(b"")
    assert e.value.reason == "empty_file"
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_caller_image_not_mutated():
    src = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    out = load_image(src)
    assert src.mode == "RGBA" and out is not src and px(out) == (255, 255, 255)
    rgb = Image.new("RGB", (2, 2))
    assert load_image(rgb) is not rgb


# ---------------------------------------------------------------- property test

MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"]


@st.composite
def random_images(draw):
    mode = draw(st.sampled_from(MODES))
    w = draw(st.integers(1, 70))
    h = draw(st.integers(1, 70))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    elif mode == "I":
        img = Image.fromarray(rng.integers(-(2**31), 2**31 - 1, (h, w), dtype=np.int64).astype(np.int32), "I")
    elif mode == "F":
        img = Image.fromarray((rng.standard_normal((h, w)) * 1000).astype(np.float32), "F")
    else:
        bands = len(Image.new(mode, (1, 1)).getbands())
        raw = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
        img = Image.frombytes(mode, (w, h), raw.tobytes()) if mode != "1" else Image.fromarray(raw[..., 0] > 127)
    as_png = draw(st.booleans()) and mode not in ("CMYK", "YCbCr", "PA", "F", "I")
    return png_bytes(img) if as_png else img


@settings(max_examples=60, deadline=None)
@given(random_images(), st.sampled_from([8, 16, 32]))
def test_preprocess_any_mode_any_size(src, size):
    t = preprocess(src, size)
    assert t.shape == (3, size, size) and t.dtype == torch.float32
    assert torch.isfinite(t).all() and t.min() >= -1.0 and t.max() <= 1.0
