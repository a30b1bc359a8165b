"""Readers of each dataset's published format, used only by prepare_data.py.

Raster and table readers (rasterio, pyarrow) are imported inside the functions that need them,
so training and evaluation never import them; install them with requirements-data.txt.
"""
