"""The run directory as a layer: storage (Parquet and JSON under one URL), the manifest and its
compatibility checks, and a finished run opened for reading (rankings with K resolved, masks,
the scanned model and data rebuilt as they were)."""
from .manifest import RunMismatch, build_manifest, check_compatible, scanned_model_spec
from .means import head_means, means_table
from .run import Run, Scanned, check_k, decode_fg, install_means, open_run, top_heads
from .storage import RunDir, StorageError, check_out, location, within

__all__ = ["Run", "RunDir", "RunMismatch", "Scanned", "StorageError", "build_manifest", "check_compatible", "check_k",
           "check_out", "decode_fg", "head_means", "install_means", "location", "means_table", "open_run",
           "scanned_model_spec", "top_heads", "within"]
