"""hawqlib: Hessian AWare Quantization (Dong et al., ICCV 2019), reproduced step by step.

The front door is :func:`quantize` (:mod:`hawqlib.workflow`): HAWQ on any network and data in one call.
"""
from .export import load_packed, save_packed
from .bitconfig import BitConfig
from .workflow import FinetuneSchedule, QuantizeReport, quantize

__version__ = "0.1.0"
__all__ = ["quantize", "QuantizeReport", "FinetuneSchedule", "BitConfig", "save_packed", "load_packed"]
