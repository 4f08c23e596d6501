"""Image grids with their indices drawn in: each tile enlarged to a readable size, a filter's index over its tile, or
row labels (filters) down the left and column labels (input channels) along the top. Drawn with a 3×5 pixel font
into the image itself, so the labels stay with their tiles at any zoom and need no Pillow."""

from __future__ import annotations

import numpy as np

#: Digits as 3×5 bitmaps, row by row.
FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111",
}
INK, PAPER = 40, 255
GLYPH_SCALE = 2            # each font pixel drawn 2 × 2: 6 × 10-pixel digits
TILE_MIN = 56              # a tile is enlarged (nearest neighbour) to at least this many pixels


def text_mask(text: str, scale: int = GLYPH_SCALE) -> np.ndarray:
    """``text`` (digits) as a boolean mask, one pixel column between glyphs."""
    glyphs = [np.array([c == "1" for c in FONT[ch]], bool).reshape(5, 3) for ch in text if ch in FONT]
    if not glyphs:
        return np.zeros((5 * scale, 0), bool)
    row = np.concatenate([np.pad(g, ((0, 0), (0, 1))) for g in glyphs], axis=1)[:, :-1]
    return np.repeat(np.repeat(row, scale, axis=0), scale, axis=1)


def _stamp(canvas: np.ndarray, text: str, top: int, centre: int | None = None, right: int | None = None) -> None:
    mask = text_mask(text)
    h, w = mask.shape
    left = (centre - w // 2) if centre is not None else (right - w)
    left, top = max(0, left), max(0, top)
    region = canvas[top:top + h, left:left + w]
    region[mask[:region.shape[0], :region.shape[1]]] = INK


def labelled_grid(tiles: list[np.ndarray], ncols: int, *, tile_labels: list[str] | None = None,
                  row_labels: list[str] | None = None, col_labels: list[str] | None = None,
                  pad: int = 3, max_width: int = 760, max_height: int = 3000) -> np.ndarray:
    """Tiles of one shape (uint8, grey or RGB) in a grid of ``ncols`` columns, enlarged to at least ``TILE_MIN``
    pixels (less where the grid would pass ``max_width`` × ``max_height``), with ``tile_labels`` over each tile,
    ``row_labels`` left of each row (every few rows where rows are thinner than a digit) and ``col_labels`` over
    each column. Returns an RGB uint8 image."""
    if not tiles:
        return np.full((1, 1, 3), PAPER, np.uint8)
    first = tiles[0]
    size = max(first.shape[0], first.shape[1])
    across, down = max(1, min(ncols, len(tiles))), -(-len(tiles) // max(1, min(ncols, len(tiles))))
    factor = max(1, min(-(-TILE_MIN // size), max_width // (across * size + 1), max_height // (down * size + 1)))
    big = [np.repeat(np.repeat(t if t.ndim == 3 else np.stack([t] * 3, -1), factor, 0), factor, 1) for t in tiles]
    h, w = big[0].shape[:2]
    text_h = 5 * GLYPH_SCALE + 2
    label_h = text_h if tile_labels else 0
    left = (max(text_mask(t).shape[1] for t in row_labels) + 4) if row_labels else 0
    top = text_h if col_labels else 0
    ncols = max(1, min(ncols, len(big)))
    nrows = -(-len(big) // ncols)
    cell_h, cell_w = label_h + h + pad, w + pad
    canvas = np.full((top + nrows * cell_h + pad, left + ncols * cell_w + pad, 3), PAPER, np.uint8)
    ink = np.full(canvas.shape[:2], PAPER, np.uint8)
    for k, tile in enumerate(big):
        r, c = divmod(k, ncols)
        y, x = top + pad + r * cell_h + label_h, left + pad + c * cell_w
        canvas[y:y + h, x:x + w] = tile
        if tile_labels:
            _stamp(ink, tile_labels[k], y - label_h + 1, centre=x + w // 2)
    every_row = max(1, -(-text_h // cell_h))
    for r, text in enumerate(row_labels or []):
        if r % every_row == 0:
            _stamp(ink, text, top + pad + r * cell_h + label_h + (h - text_h) // 2 + 1, right=left - 2)
    every_col = max(1, -(-(text_mask(str(ncols)).shape[1] + 2) // cell_w))
    for c, text in enumerate((col_labels or [])[:ncols]):
        if c % every_col == 0:
            _stamp(ink, text, 1, centre=left + pad + c * cell_w + w // 2)
    canvas[ink == INK] = INK
    return canvas
