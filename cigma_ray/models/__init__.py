"""Model adapters: a model as embed -> blocks -> readout with addressable heads.

base.py is the adapter contract, registry.py the families and `load`; a family per module
(timm_loader.py for `timm:NAME`, the hf/ package for `hf:PATH`) registers itself on import.
surgery.py and attention.py act on loaded models (zeroed or smaller weights, attention rollout).
"""
from . import timm_loader  # noqa: F401,I001 - registers the timm: family (first: the default in messages)
from . import hf  # noqa: F401 - registers the hf: family
from .base import HeadAdapter, ModelError, ModelSpec, scanned_heads
from .hf import spec_from_options, spec_with_classes
from .registry import LoadedModel, check_name, load, register

__all__ = ["HeadAdapter", "ModelError", "ModelSpec", "scanned_heads", "LoadedModel", "check_name", "load", "register",
           "spec_from_options", "spec_with_classes"]
