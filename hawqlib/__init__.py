"""hawqlib: Hessian AWare Quantization (Dong et al., ICCV 2019), reproduced step by step."""
__version__ = "0.1.0"
