"""Image loading and preprocessing: whatever users have on disk -> RGB -> (3, S, S) tensor in [-1, 1].

``load_image`` is the one place that opens image files. It handles

* every mode users have: RGBA / LA / PA / P or L or RGB with a transparency key (composited onto
  white), L, 1, CMYK (e.g. CMYK JPEG), I;16 (16-bit PNG), I (32-bit int), F (float), YCbCr, ...;
* EXIF orientation (the 8 orientations of tag 0x0112);
* big images cheaply: JPEGs are decoded at reduced scale with ``draft`` and other images shrunk with
  ``reduce`` when a target size is known (``shrink_to``), so a 10000x10000 photo is fast;
* decompression bombs: the pixel count is read from the header and checked against ``max_pixels``
  *before* anything is decoded; PIL's own DecompressionBombError maps to the same error;
* bad files, each with its own ``ImageError.reason``: "missing", "empty_file", "not_an_image",
  "truncated", "too_large", "unreadable". Truncated files are refused (LOAD_TRUNCATED_IMAGES stays off).

``resize_center_crop`` resizes the short side and crops the centre; ``preprocess`` chains both and
returns a float tensor. Images that keep their aspect ratio instead (a vocabulary with grid tokens) get
their code grid from ``aspect_grid`` and their pixels from ``preprocess_to_grid``; ``to_pil`` inverts it; ``image_grid`` lays images out in a sheet (used for
every sample / reconstruction sheet in the project).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from earlyfusion.core.errors import UserError
from earlyfusion.tokenizer.vq_config import grid_pixels

# The largest image worth decoding: 4096 x 4096 (a 12-16 MP phone photo fits). Tokenizers read at most
# 512 px a side, so anything larger is either a decompression bomb or a file to downscale first; the
# check runs on the header, before anything is decoded.
MAX_PIXELS: int = 4096 * 4096

# The raster formats photographs come in. Pillow is never asked to identify anything else: formats such
# as EPS/PDF hand the file to external programs (Ghostscript), which must never see a data file.
RASTER_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "TGA")

REASONS = ("missing", "empty_file", "not_an_image", "truncated", "too_large", "unreadable", "too_small",
           "extreme_aspect")

WHITE = (255, 255, 255)

# EXIF orientation tag value -> the transposition that makes the image upright.
_ORIENTATION = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}
_EXIF_ORIENTATION_TAG = 0x0112

# Leading bytes of formats we recognise: a file that starts like an image but cannot be parsed is
# damaged ("unreadable"), not "not_an_image".
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")

_ADVICE = {
    "missing": "check the path",
    "empty_file": "the file has zero bytes; re-create or remove it",
    "not_an_image": "the file is not an image PIL can read; remove it or convert it to PNG/JPEG",
    "truncated": "the file is incomplete (interrupted download or copy); re-create or remove it",
    "too_large": "refusing to decode it (possible decompression bomb); downscale the image or raise max_pixels",
    "unreadable": "the image data is damaged or uses an unsupported mode; re-save it as PNG/JPEG",
    "too_small": "it is smaller than one image code; remove it or enlarge it",
    "extreme_aspect": "the largest code grid cannot hold its shape; crop it closer to square or remove it",
}


class ImageError(UserError):
    """An image that cannot be used; ``reason`` is one of ``REASONS`` (used to count skipped records)."""

    def __init__(self, reason: str, where: str, detail: str = ""):
        assert reason in REASONS, reason
        self.reason = reason
        self.where = where
        text = f"{where}: {reason.replace('_', ' ')}"
        if detail:
            text += f" ({detail})"
        super().__init__(f"{text}; {_ADVICE[reason]}")


# ---------------------------------------------------------------- loading


def _describe(src) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return "<image>"


def _open(src, where: str) -> tuple[Image.Image, bytes]:
    """Open (header only) with each failure mapped to an ImageError reason; also returns the file's bytes."""
    if isinstance(src, (str, Path)):
        path = Path(src)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageError("missing", where, "no such file") from None
        except OSError as e:
            raise ImageError("unreadable", where, str(e)) from None
        if path.is_dir():
            raise ImageError("not_an_image", where, "is a directory")
        if size == 0:
            raise ImageError("empty_file", where)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ImageError("unreadable", where, str(e)) from None
    else:
        data = bytes(src)
        if not data:
            raise ImageError("empty_file", where)
    try:
        with warnings.catch_warnings():
            # We check the size ourselves against max_pixels, before decoding.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=RASTER_FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", where, str(e).split(",")[0]) from None
    except UnidentifiedImageError:
        if data.startswith(_SIGNATURES) or data[8:12] == b"WEBP":
            raise ImageError("truncated" if _missing_end(data) else "unreadable", where,
                             "the header cannot be parsed") from None
        raise ImageError("not_an_image", where) from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
        reason = "truncated" if _is_truncation(e) or _missing_end(data) else "unreadable"
        raise ImageError(reason, where, str(e)) from None
    return img, data


def _png_rows_missing(data: bytes, img: Image.Image) -> bool:
    """Whether a PNG's compressed pixel data ends before the rows its header declares.

    Pillow stops quietly at the end of a complete zlib stream and leaves the missing rows black, so the
    inflated size is counted here (in bounded pieces) and compared with what the header implies.
    """
    try:
        depth, colour, interlace = data[24], data[25], data[28]
    except IndexError:
        return True
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour)
    if channels is None:
        return False  # an unknown colour type: leave the verdict to Pillow's decoder
    w, h = img.size
    passes = [(w, h)] if not interlace else [
        ((w - x0 + dx - 1) // dx, (h - y0 + dy - 1) // dy)
        for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))]
    expected = sum(ph * (1 + (pw * channels * depth + 7) // 8) for pw, ph in passes if pw and ph)
    inflate, got, pos = zlib.decompressobj(), 0, 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        if kind == b"IDAT":
            chunk = data[pos + 8:pos + 8 + length]
            try:
                while chunk and got < expected:
                    got += len(inflate.decompress(chunk, 1 << 20))
                    chunk = inflate.unconsumed_tail
            except zlib.error:
                return True
        elif kind == b"IEND":
            break
        pos += 12 + length
    return got < expected


def _missing_end(data: bytes) -> bool:
    """Whether a file in a format with an end marker lacks it (cut short), or is too short to hold a header."""
    if len(data) < 64:
        return True
    if data.startswith(b"\x89PNG"):
        return b"IEND" not in data[-16:]
    if data.startswith(b"\xff\xd8\xff"):
        return not data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if data.startswith((b"GIF87a", b"GIF89a")):
        return not data.rstrip(b"\x00").endswith(b";")
    return False


def _is_truncation(e: BaseException) -> bool:
    msg = str(e).lower()
    return isinstance(e, (EOFError, struct.error)) or "truncat" in msg or "broken data stream" in msg


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float images -> L, scaling the value range to 0..255."""
    a = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
        if img.mode == "I" and a.max(initial=0) > 65535:  # genuinely 32-bit: stretch to its own range
            lo, hi = float(a.min()), float(a.max())
            a = (a.astype(np.float64) - lo) * (255.0 / max(hi - lo, 1.0))
        else:
            a = a.astype(np.float64) / 257.0
    elif img.mode == "F":
        a = a.astype(np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
        if lo >= 0.0 and hi <= 1.0:
            a = a * 255.0  # the usual [0, 1] float convention
        elif lo < 0.0 or hi > 255.0:
            a = (a - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _normalise_mode(img: Image.Image) -> Image.Image:
    """Any mode -> one of L, LA, RGB, RGBA (alpha kept for compositing after the shrink)."""
    if img.mode.startswith("I") or img.mode == "F":
        return _to_8bit(img)
    has_key = "transparency" in img.info
    if img.mode in ("RGB", "L") and not has_key:
        return img
    if img.mode in ("RGBA", "LA"):
        return img
    if img.mode in ("P", "PA", "1") or has_key:
        return img.convert("RGBA" if (has_key or img.mode == "PA") else "RGB")
    if img.mode in ("La", "RGBa"):
        return img.convert("RGBA")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...


def load_image(src: str | Path | bytes | Image.Image, max_pixels: int = MAX_PIXELS, *,
               shrink_to: int | None = None) -> Image.Image:
    """Open any image as an upright RGB PIL image (transparency composited onto white).

    ``max_pixels`` refuses decompression bombs before decoding (ImageError "too_large").
    ``shrink_to``: the caller only needs a short side of at least this many pixels, so big images are
    decoded at reduced scale (JPEG draft) or shrunk by an integer factor (reduce) — much faster.
    Raises ImageError (a UserError) with ``reason`` for every way a file can be bad.
    """
    where = _describe(src)
    if isinstance(src, Image.Image):
        img, data = src, b""
    else:
        img, data = _open(src, where)
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError("too_large", where, f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
    if w == 0 or h == 0:
        raise ImageError("unreadable", where, f"zero-sized image {w}x{h}")
    if img.format == "PNG" and data and _png_rows_missing(data, img):
        raise ImageError("truncated", where, "the PNG holds fewer rows than its header declares")
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF must not lose an otherwise good image
        orientation = 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if shrink_to and img is not src and img.format == "JPEG" and min(w, h) > 2 * shrink_to:
                img.draft(None, (shrink_to, shrink_to))  # decode at 1/2, 1/4 or 1/8 scale
            img.load()
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", where, str(e).split(",")[0]) from None
    except (OSError, SyntaxError, ValueError, IndexError, struct.error, EOFError, zlib.error) as e:
        raise ImageError("truncated" if _is_truncation(e) else "unreadable", where, str(e)) from None

    try:
        img = _normalise_mode(img)
    except (ValueError, OSError) as e:
        raise ImageError("unreadable", where, f"cannot convert mode {img.mode}: {e}") from None
    if shrink_to and min(img.size) >= 2 * shrink_to:
        factor = min(img.size) // shrink_to
        if img.mode in ("RGBA", "LA"):  # average premultiplied colours so transparent pixels don't bleed
            premult = "RGBa" if img.mode == "RGBA" else "La"
            img = img.convert(premult).reduce(factor).convert(img.mode)
        else:
            img = img.reduce(factor)
    for op in _ORIENTATION.get(orientation, ()):
        img = img.transpose(op)
    if img.mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img is src:
        img = img.copy()  # never hand back (and let callers mutate) the caller's own object
    return img


# ---------------------------------------------------------------- geometry and tensors


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale so the short side is ``size`` and crop the centre ``size`` x ``size`` square.

    Done as one resample of the centre square (no intermediate image); a ``size`` x ``size`` input
    comes back unchanged (pixel-exact), so already-sized data is never blurred.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    box = (left, top, left + side, top + side)
    if side == size and (w, h) == (size, size):
        return img.copy()
    if side == size:
        return img.crop(box)
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box,
                      reducing_gap=3.0 if side > 3 * size else None)


def preprocess(src: str | Path | bytes | Image.Image, size: int, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Any image -> float32 tensor (3, size, size) in [-1, 1]."""
    img = resize_center_crop(load_image(src, max_pixels, shrink_to=size), size)
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (S, S, 3) uint8
    return a.permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0)  # (3, S, S)


def aspect_grid(width: int, height: int, max_grid: tuple[int, int], downsample: int,
                where: str = "image") -> tuple[int, int]:
    """The code grid (rows, columns) of a ``width`` x ``height`` image that keeps its aspect ratio: scaled to the
    largest size that fits ``max_grid`` codes, each side rounded to whole codes (so the shape is off by at
    most half a code per side). ImageError "too_small" for an image smaller than one code (``downsample``
    pixels) on a side, "extreme_aspect" where its short side would be under half a code."""
    H, W = max_grid
    if min(width, height) < downsample:
        raise ImageError("too_small", where, f"{width}x{height} px; one code is {downsample}x{downsample} px")
    scale = min(W / width, H / height)  # codes per pixel
    cols, rows = width * scale, height * scale
    if min(cols, rows) < 0.5:
        raise ImageError("extreme_aspect", where, f"{width}x{height} px in at most {H}x{W} codes (rows x columns) "
                         f"would be {rows:.2f} x {cols:.2f} codes")
    return min(H, max(1, round(rows))), min(W, max(1, round(cols)))


def preprocess_to_grid(src: str | Path | bytes | Image.Image, max_grid: tuple[int, int], downsample: int,
                       max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Any image -> float32 tensor (3, rows·downsample, cols·downsample) in [-1, 1], the whole image (no crop)
    resized to its ``aspect_grid``."""
    img = load_image(src, max_pixels, shrink_to=min(grid_pixels(*max_grid, downsample)))
    rows, cols = aspect_grid(*img.size, max_grid, downsample, _describe(src))
    height, width = grid_pixels(rows, cols, downsample)
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BICUBIC)
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (h, w, 3) uint8
    return a.permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0)


def preprocess_for_codes(src: str | Path | bytes | Image.Image, image_size: int, downsample: int,
                         max_grid: tuple[int, int] | None = None, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Any image -> the pixels the image tokenizer encodes: the centre square (``preprocess``, image_size a side), or
    with ``max_grid`` (a vocabulary with grid tokens) the whole image at its own grid (``preprocess_to_grid``)."""
    if max_grid is None:
        return preprocess(src, image_size, max_pixels)
    return preprocess_to_grid(src, max_grid, downsample, max_pixels)


def to_pil(t: torch.Tensor) -> Image.Image:
    """Tensor (3, H, W) in [-1, 1] -> RGB PIL image (values outside the range are clipped)."""
    if t.dim() != 3 or t.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(t.shape)}")
    a = ((t.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)  # (3, H, W)
    return Image.fromarray(a.permute(1, 2, 0).contiguous().numpy(), "RGB")


@torch.no_grad()
def codes_to_pil(vq, codes: torch.Tensor) -> Image.Image:
    """One code grid (h, w) -> the image tokenizer's decoding of it as an RGB PIL image."""
    return to_pil(vq.decode(codes[None].long())[0])


def image_grid(images: list[Image.Image], ncols: int, pad: int = 2, background=WHITE) -> Image.Image:
    """Lay images out row-major in ``ncols`` columns with ``pad`` pixels between and around them."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    ncols = max(1, min(ncols, len(images)))
    nrows = (len(images) + ncols - 1) // ncols
    cw = max(im.width for im in images)
    ch = max(im.height for im in images)
    sheet = Image.new("RGB", (pad + ncols * (cw + pad), pad + nrows * (ch + pad)), background)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        sheet.paste(im.convert("RGB"), (pad + c * (cw + pad), pad + r * (ch + pad)))
    return sheet


def is_image_file(path: str | Path) -> bool:
    """Whether a file name has an image extension PIL registers (used to list image folders)."""
    ext = os.path.splitext(str(path))[1].lower()
    if not ext:
        return False
    return ext in _image_extensions()


_EXTENSIONS: set[str] | None = None


def _image_extensions() -> set[str]:
    global _EXTENSIONS
    if _EXTENSIONS is None:
        Image.init()
        _EXTENSIONS = {e.lower() for e, fmt in Image.registered_extensions().items() if fmt in RASTER_FORMATS}
    return _EXTENSIONS
