"""Progress bars for long work (stages, evaluations): units done, rate and ETA, on stderr."""
from __future__ import annotations


def progress_bar(stage: str, total: int, initial: int, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"{stage:>7}", unit=unit, unit_scale=True,
                disable=not enabled, dynamic_ncols=True, smoothing=0.1)
