"""Cutting large rasters into square tiles, for the Woody and folder readers.

A raster of H x W pixels is covered by ceil(H / tile) x ceil(W / tile) tiles from its top-left
corner; tiles that cross the right or bottom edge are kept and padded (0 by default), and each
read reports which of its pixels lie outside the raster, so the caller can mark them ignored
in the mask and leave them out of the band statistics (rvit/h5_writer.py).
"""
import numpy as np


def tile_grid(height, width, tile):
    """(rows, cols): tiles of side `tile` pixels needed to cover a height x width raster."""
    return -(-height // tile), -(-width // tile)


def tile_origins(height, width, tile):
    """[(row, col)] pixel origins of every tile of the grid, row by row."""
    rows, cols = tile_grid(height, width, tile)
    return [(r * tile, c * tile) for r in range(rows) for c in range(cols)]


def read_window(src, window, indexes, fill=0):
    """Bands `indexes` (1-based) of an open rasterio dataset `src` in a rasterio Window
    (col_off, row_off, width, height) that may cross the raster's edge.

    Returns:
        (len(indexes), height, width) array in the raster's dtype, `fill` beyond the edge, and
        (height, width) bool: True beyond the edge, or where the first band read is nodata.
    """
    image = src.read(indexes, window=window, boundless=True, fill_value=fill)
    valid = src.read(indexes[0], window=window, boundless=True, masked=True)
    return image, np.ma.getmaskarray(valid)


def pad_window(array, row, col, height, width, fill=0):
    """The window (row, col, height, width) of an in-memory (..., H, W) array.

    Returns:
        (..., height, width) copy in the array's dtype, `fill` beyond the edge, and
        (height, width) bool, True beyond the edge.
    """
    part = array[..., row:row + height, col:col + width]
    h, w = part.shape[-2:]
    out = np.full((*array.shape[:-2], height, width), fill, array.dtype)
    out[..., :h, :w] = part
    outside = np.ones((height, width), bool)
    outside[:h, :w] = False
    return out, outside
