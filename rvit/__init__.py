"""RViT: redundancy-aware Vision Transformers for Earth-observation imagery.

After "Hide and Seek: Investigating Redundancy in Earth Observation Imagery"
(Papazafeiropoulos et al., arXiv 2603.13524).
"""
from rvit.vit import VisionTransformer, vit_base, vit_small, vit_tiny

__all__ = ["VisionTransformer", "vit_tiny", "vit_small", "vit_base"]
