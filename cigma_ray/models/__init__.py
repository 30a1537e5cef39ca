"""Model adapters: a model as embed -> blocks -> readout with addressable heads."""
from .base import HeadAdapter, ModelError, ModelSpec
from .loader import LoadedModel, load, register

__all__ = ["HeadAdapter", "ModelError", "ModelSpec", "LoadedModel", "load", "register"]
