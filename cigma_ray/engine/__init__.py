"""What one model replica does fast: batched masks, prefix-shared head scans."""
from .replica import PRECISIONS, MaskResult, Replica
from .scan import Ablated, scan_heads

__all__ = ["PRECISIONS", "Ablated", "MaskResult", "Replica", "scan_heads"]
