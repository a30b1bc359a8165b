"""RViT: redundancy-aware Vision Transformers for Earth-observation imagery.

After "Hide and Seek: Investigating Redundancy in Earth Observation Imagery"
(Papazafeiropoulos et al., arXiv 2603.13524). The method: rvit/vit.py (a ViT that runs on the
tokens a `select` hook keeps), rvit/masking.py (`TokenMasker`: which tokens each image keeps),
rvit/upernet.py (`RUPerNet`: segmentation on the kept tokens, the grid restored).
"""
# where each public name lives; loaded on first use, so that prepare_data.py (which needs the
# HDF5 schema, rvit/schema.py, but no torch) does not pay for importing torch
_PUBLIC = {"VisionTransformer": "vit", "vit_tiny": "vit", "vit_small": "vit", "vit_base": "vit",
           "TokenMasker": "masking", "Selection": "masking", "RUPerNet": "upernet"}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        import importlib
        return getattr(importlib.import_module(f"rvit.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'rvit' has no attribute {name!r}")
