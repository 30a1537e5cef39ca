"""Model adapters: a model as embed -> blocks -> readout with addressable heads."""
from .base import HeadAdapter, ModelError, ModelSpec
from .loader import LoadedModel, load, register
from .hf import spec_from_options, spec_with_classes  # registers the hf: family (imports transformers only when used)

__all__ = ["HeadAdapter", "ModelError", "ModelSpec", "LoadedModel", "load", "register", "spec_from_options",
           "spec_with_classes"]
