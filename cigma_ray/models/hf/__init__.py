"""Hugging Face models (`hf:PATH`): CLIP zero-shot classifiers and vision-language models."""
from .common import options, spec_from_options, spec_with_classes
from .loader import ADAPTERS, load_hf

__all__ = ["ADAPTERS", "load_hf", "options", "spec_from_options", "spec_with_classes"]
