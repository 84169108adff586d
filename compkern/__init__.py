"""compkern: fused kernels and the compositional-diffusion methods built on them.

Layers (bottom to top): ``kernels`` (torch reference, Triton, C++ ``_C``) -> ``ops`` (one public
op per file) -> ``models`` / ``samplers`` -> ``lift`` (CompLift), ``train`` (CoInD, SepEn),
``pipelines`` (Stable Diffusion front ends). See ../shared/DESIGN.md.
"""
from compkern import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
