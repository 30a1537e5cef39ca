"""means/: mean ablation's substitutes (config `ablation: mean`). Each unit of the means stage writes, per
layer, the float64 sum of the heads' outputs (the output projection's input) over its images of D and all
their tokens, with the row count and the image count; a head's mean is the sum over every unit divided by
the rows, summed in file order, so it does not depend on how many replicas ran the units."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .storage import RunDir, StorageError

FOLDER = "means"


def means_table(sums: list, counts: list[int], images: int) -> pa.Table:
    """A means unit's file: one row per layer (layer, rows, images, sum)."""
    return pa.table({"layer": pa.array(range(len(sums)), pa.int32()), "rows": pa.array(counts, pa.int64()),
                     "images": pa.array([images] * len(sums), pa.int64()),
                     "sum": pa.array([np.asarray(s, np.float64) for s in sums], pa.list_(pa.float64()))})


def head_means(run: RunDir, images: int | None = None) -> list[np.ndarray]:
    """Per layer, the (heads x head_dim,) mean of its heads' outputs over D's images and tokens, in float64.
    With `images` (|D|), the units must cover that many images: a partial means/ is an error."""
    table = run.read_folder(FOLDER, ["layer", "rows", "images", "sum"])
    if table is None or table.num_rows == 0:
        raise StorageError(f"{run.url} has no {FOLDER}/ (config ablation: mean needs the heads' means over D): "
                           "finish the run with the scan command that made it")
    layers = table["layer"].to_numpy()
    n_layers = int(layers.max()) + 1
    rows = np.zeros(n_layers, np.int64)
    sums: list[np.ndarray | None] = [None] * n_layers
    counted = 0
    for layer, r, n, s in zip(layers, table["rows"].to_numpy(), table["images"].to_numpy(),
                              table["sum"].to_numpy(zero_copy_only=False)):
        sums[layer] = np.asarray(s, np.float64) if sums[layer] is None else sums[layer] + s
        rows[layer] += r
        counted += n if layer == 0 else 0
    if images is not None and counted != images:
        raise StorageError(f"{run.url}/{FOLDER}/ covers {counted} images of D, not {images}: finish the run with the "
                           "scan command that made it")
    if any(s is None for s in sums) or (rows == 0).any():
        raise StorageError(f"{run.url}/{FOLDER}/ is incomplete or damaged: remove it and run the scan command again")
    return [s / r for s, r in zip(sums, rows)]
