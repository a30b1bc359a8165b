"""Woody (Kattenborn et al. 2019, RSE 227:61-73): UAV orthomosaics of invasive woody species in
Chile, as distributed on Zenodo (records 7565500, 7565490, 7565546) and used by FoMo-Bench.

Per site `<site>_ortho.tif` (RGB, optional alpha), `<site>_canopy.shp` (canopy polygons of the
site's species) and `<site>_AOI.shp` (area of interest). The species comes from the site name:
acacia_* -> 1 Acacia dealbata, pinus_* -> 2 Pinus radiata, ulex_* -> 3 Ulex europaeus; 0 is
background. Polygons are reprojected to the ortho's CRS when theirs differs (GDAL, via rasterio)
and burnt into its grid; pixels outside the AOI, or transparent in the ortho, are `IGNORE`.
Tiles wholly outside the AOI are skipped; tiles crossing the raster edge are padded as ignored.
"""
import glob
import os

import numpy as np

from rvit.tiles import read_window, tile_grid

CLASSES = ("background", "Acacia dealbata", "Pinus radiata", "Ulex europaeus")
SPECIES = {"acacia": 1, "pinus": 2, "ulex": 3}
IGNORE = 255
TILE = 224  # default tile side in pixels: the ViT's 224 x 224 input, no resizing
TEST_SITES = ("pinus_f2", "ulex_f4", "acacia_f1")  # FoMo-Bench's held-out sites


def find_sites(root):
    """{site: (ortho, canopy shp, AOI shp)} for every `<site>_ortho.tif` below root.

    Raises FileNotFoundError for a missing shapefile, ValueError for an unknown species prefix.
    """
    sites = {}
    for ortho in sorted(glob.glob(os.path.join(root, "**", "*_ortho.tif"), recursive=True)):
        site = os.path.basename(ortho)[:-len("_ortho.tif")]
        if site.split("_")[0].lower() not in SPECIES:
            raise ValueError(f"{ortho}: site {site!r} names no known species {sorted(SPECIES)}")
        folder = os.path.dirname(ortho)
        shp = tuple(os.path.join(folder, f"{site}_{kind}.shp") for kind in ("canopy", "AOI"))
        for path in shp:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: missing shapefile for site {site}")
        sites[site] = (ortho, *shp)
    return sites


def read_shapes(path, dst_crs):
    """Polygons of a shapefile as GeoJSON-like dicts in `dst_crs` (rasterio CRS).

    The shapefile's CRS comes from its .prj; without one it is assumed to be `dst_crs`.
    """
    import shapefile
    from rasterio.crs import CRS
    from rasterio.warp import transform_geom

    try:
        with shapefile.Reader(path) as r:
            geoms = [s.__geo_interface__ for s in r.shapes() if s.points]
    except shapefile.ShapefileException as e:
        raise ValueError(f"{path}: unreadable shapefile ({e})") from e
    prj = path[:-4] + ".prj"
    if os.path.isfile(prj):
        with open(prj) as f:
            src_crs = CRS.from_wkt(f.read())
        if src_crs != dst_crs:
            geoms = [transform_geom(src_crs, dst_crs, g) for g in geoms]
    return geoms


class Site:
    """One Woody site: its orthomosaic, species and polygons (read and reprojected once).

    Raises ValueError for an unreadable ortho or shapefile, or an ortho that is not RGB uint8.
    """

    def __init__(self, name, ortho, canopy_path, aoi_path):
        import rasterio

        self.name, self.ortho = name, ortho
        self.species = SPECIES[name.split("_")[0].lower()]
        try:
            with rasterio.open(ortho) as src:
                if src.count < 3 or src.dtypes[0] != "uint8":
                    raise ValueError(f"{ortho}: {src.count} band(s) of {src.dtypes[0]}, "
                                     "expected RGB uint8")
                self.crs, self.transform = src.crs, src.transform
                self.height, self.width = src.height, src.width
        except rasterio.errors.RasterioError as e:
            raise ValueError(f"{ortho}: unreadable GeoTIFF ({e})") from e
        self.canopy = read_shapes(canopy_path, self.crs)
        self.aoi = read_shapes(aoi_path, self.crs)

    def tile_origins(self, tile):
        """(row, col) pixel origins of the tile x tile tiles that touch the AOI."""
        from rasterio.features import rasterize

        if not self.aoi:
            return []
        rows, cols = tile_grid(self.height, self.width, tile)
        coarse = self.transform @ self.transform.scale(tile, tile)  # one pixel per tile
        touched = rasterize([(g, 1) for g in self.aoi], out_shape=(rows, cols),
                            transform=coarse, all_touched=True, dtype="uint8")
        return [(int(r) * tile, int(c) * tile) for r, c in zip(*np.nonzero(touched))]

    def read_tile(self, row, col, tile):
        """(3, tile, tile) uint8 RGB (0 past the raster's edge), (tile, tile) uint8 class map,
        IGNORE outside the AOI, the raster or the ortho's alpha, and (tile, tile) bool, True
        on the ortho's real pixels (inside the raster, not transparent)."""
        import rasterio
        from rasterio.features import rasterize
        from rasterio.windows import Window

        window = Window(col, row, tile, tile)
        with rasterio.open(self.ortho) as src:
            image, outside = read_window(src, window, [1, 2, 3])
            if src.count >= 4:
                outside |= src.read(4, window=window, boundless=True, fill_value=0) == 0
            transform = src.window_transform(window)
        shape = (tile, tile)
        mask = np.zeros(shape, np.uint8)
        if self.canopy:
            mask = rasterize([(g, self.species) for g in self.canopy], out_shape=shape,
                             transform=transform, dtype="uint8")
        in_aoi = rasterize([(g, 1) for g in self.aoi], out_shape=shape, transform=transform,
                           dtype="uint8")
        mask[(in_aoi == 0) | outside] = IGNORE
        return image, mask, ~outside
