"""RViT: redundancy-aware Vision Transformers for Earth-observation imagery.

After "Hide and Seek: Investigating Redundancy in Earth Observation Imagery"
(Papazafeiropoulos et al., arXiv 2603.13524).
"""
__all__ = ["VisionTransformer", "vit_tiny", "vit_small", "vit_base"]


def __getattr__(name):
    # the models load torch on first use only, so that prepare_data.py (which needs the HDF5
    # schema, rvit/schema.py, but no torch) starts in a fraction of the time
    if name in __all__:
        from rvit import vit
        return getattr(vit, name)
    raise AttributeError(f"module 'rvit' has no attribute {name!r}")
