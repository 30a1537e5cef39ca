"""What one model replica does fast: batched masks, prefix-shared head scans."""
from .replica import PRECISIONS, MaskResult, Replica
from .scan import scan_heads

__all__ = ["PRECISIONS", "MaskResult", "Replica", "scan_heads"]
