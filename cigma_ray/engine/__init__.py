"""What one model replica does fast: batched masks, prefix-shared head scans, the gradient pre-screen."""
from .replica import PRECISIONS, MaskResult, Replica
from .scan import Ablated, scan_heads
from .screen import Screened, gate_gradients, screen_images

__all__ = ["PRECISIONS", "Ablated", "MaskResult", "Replica", "Screened", "gate_gradients", "scan_heads",
           "screen_images"]
