"""Small PNG images without Pillow: arrays scaled to 8 bits, tiled into one mosaic, encoded as PNG and as a
``data:`` URI; a filter's coefficients and a layer's activation maps as images."""

from __future__ import annotations

import base64
import math
import struct
import zlib

import numpy as np


def to_uint8(arr: np.ndarray, symmetric: bool = False) -> np.ndarray:
    """Scale to 0–255: min..max, or ±max|a| around mid grey when ``symmetric``; a constant array is mid grey.
    A diverged run's values do not blank the image: NaN counts as 0 and ±inf as the extreme finite values, and
    the scaling halves first where max − min overflows (±1e308)."""
    a = np.asarray(arr, dtype=np.float64)
    if not a.size:
        return np.full(a.shape, 128, dtype=np.uint8)
    finite = np.isfinite(a)
    if not finite.all():
        fin = a[finite]
        lo_f, hi_f = (fin.min(), fin.max()) if fin.size else (0.0, 0.0)
        a = np.where(np.isnan(a), 0.0, np.clip(a, lo_f, hi_f))
    if symmetric:
        m = np.abs(a).max() or 1.0
        return np.clip((a / m + 1) * 127.5, 0, 255).astype(np.uint8)
    lo, hi = a.min(), a.max()
    if hi <= lo:
        return np.full(a.shape, 128, dtype=np.uint8)
    with np.errstate(over="ignore"):
        span = hi - lo
    if np.isfinite(span):  # (a - lo) / span: also a subnormal span, whose half would round to 0
        return np.clip((a - lo) / span * 255, 0, 255).astype(np.uint8)
    return np.clip((a / 2 - lo / 2) / (hi / 2 - lo / 2) * 255, 0, 255).astype(np.uint8)


def png_bytes(img: np.ndarray) -> bytes:
    """Encode an H×W (grey) or H×W×3 (RGB) uint8 array as PNG, without Pillow."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    if img.ndim == 2:
        color = 0
    elif img.ndim == 3 and img.shape[2] == 3:
        color = 2
    else:
        raise ValueError(f"png_bytes wants H×W or H×W×3, got {img.shape}")
    h, w = img.shape[:2]
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def data_uri(img: np.ndarray, scale: int = 1) -> str:
    """A PNG ``data:`` URI of ``img``, each pixel repeated ``scale`` × ``scale`` times."""
    if scale > 1:
        img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def filter_image(weight: np.ndarray, rgb: bool | None = None) -> np.ndarray:
    """One filter (in_ch×kh×kw) as an image: RGB when it has 3 input channels, else its input channels side by
    side (grey, symmetric around 0 = mid grey). A 3-D conv's filter (in_ch×kd×kh×kw) is a row of kd slices per input
    channel."""
    w = np.asarray(weight, float)
    if w.ndim == 1:
        return to_uint8(w[None, :], symmetric=True)
    if w.ndim == 2:
        return to_uint8(w, symmetric=True)
    if rgb is None:
        rgb = w.ndim == 3 and w.shape[0] == 3
    if rgb:
        return to_uint8(np.transpose(w, (1, 2, 0)))
    slices = w.reshape(-1, *w.shape[-2:])
    ncols = min(len(w), 8) if w.ndim == 3 else int(np.prod(w.shape[1:-2]))
    return mosaic([to_uint8(c, symmetric=True) for c in slices], ncols=ncols, pad=1)


def activation_image(maps: np.ndarray, symmetric: bool = False) -> np.ndarray:
    """One probe image's activation maps of a layer (``act/<L>[p]``, channels first) as one grey image: a grid of
    the C maps of a conv (``[C, H, W]``), a row of depth slices per channel for a 3-D conv (``[C, D, H, W]``), a
    row of C values for a Linear (``[C]``), a row per filter for a Linear on tokens or a Conv1d (``[C, T]``)."""
    if maps.ndim >= 3 and maps.shape[-1] > 1 and maps.shape[-2] > 1:
        ncols = 8 if maps.ndim == 3 else int(np.prod(maps.shape[1:-2]))
        return mosaic([to_uint8(m, symmetric=symmetric) for m in maps.reshape(-1, *maps.shape[-2:])], ncols=ncols,
                      pad=1)
    rows = maps[None, :] if maps.ndim == 1 else maps.reshape(maps.shape[0], -1)
    return to_uint8(rows, symmetric=symmetric)


def fit_rows(img: np.ndarray, width: int = 560, max_height: int = 480, max_repeat: int = 8) -> np.ndarray:
    """A grey image of one row per filter (a weight matrix, a Linear's or Conv1d's maps) laid out to be read at about
    ``width`` pixels: more columns than that are averaged in bins, fewer are widened (at most ``max_repeat`` times),
    and each row becomes a band of up to ``max_repeat`` pixels, thinner when there are many rows."""
    rows, cols = img.shape
    if not rows or not cols:   # a layer with no filter, or filters of no value: one grey pixel
        return np.full((1, 1), 128, dtype=np.uint8)
    if cols > width:
        bin_size = -(-cols // width)
        padded = np.full((rows, -(-cols // bin_size) * bin_size), np.nan)
        padded[:, :cols] = img
        img = np.nanmean(padded.reshape(rows, -1, bin_size), axis=2).round().astype(np.uint8)
    img = np.repeat(img, max(1, min(max_repeat, max_height // rows)), axis=0)
    return np.repeat(img, max(1, min(max_repeat, width // img.shape[1])), axis=1)


def mosaic(tiles: list[np.ndarray], ncols: int, pad: int = 1, fill: float = 255, border: bool = True
           ) -> np.ndarray:
    """Tiles of one shape (uint8 grey or RGB, or floats with ``fill=np.nan``) in a grid, ``pad`` pixels of ``fill``
    between them; ``border`` False leaves out the leading gutters (a gutter then follows every tile)."""
    if not tiles:
        return np.full((1, 1), fill, dtype=np.uint8)
    h, w = tiles[0].shape[:2]
    extra = tiles[0].shape[2:]
    ncols = max(1, min(ncols, len(tiles)))
    nrows = math.ceil(len(tiles) / ncols)
    lead = pad if border else 0
    dtype = np.uint8 if isinstance(fill, (int, np.integer)) else np.result_type(tiles[0].dtype, fill)
    out = np.full((nrows * (h + pad) + lead, ncols * (w + pad) + lead) + extra, fill, dtype=dtype)
    for k, t in enumerate(tiles):
        r, c = divmod(k, ncols)
        out[lead + r * (h + pad): lead + r * (h + pad) + h, lead + c * (w + pad): lead + c * (w + pad) + w] = t
    return out
