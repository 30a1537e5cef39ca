"""A run directory opened for reading: its manifest and config, the scores it can rank by, its rankings
with K resolved and checked, its masks, and the scanned model and data rebuilt as run.json records
them (`Run.reopen`), refusing weights or an image listing other than the ones the run scanned."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import torch

from ..config import Config, ConfigError, from_dict, resolve_k
from ..data import DataError, ImageSource, open_source
from ..engine import Replica
from ..method import available_scores
from ..models import LoadedModel, ModelError, ModelSpec, load, scanned_heads
from .manifest import scanned_model_spec
from .means import head_means
from .storage import RunDir, StorageError


def open_run(url: str) -> "Run":
    """An existing run directory (a clear error when the URL holds none)."""
    return Run(url)


def check_k(k: int, n_heads: int, name: str = "top_k", allow_zero: bool = False) -> None:
    """K heads to remove: 1 to n_heads (a sweep may also name 0, the intact model)."""
    low = 0 if allow_zero else 1
    if not low <= k <= n_heads:
        raise ConfigError(f"{name}={k}: the model has {n_heads} heads; choose K from {low} to {n_heads}")


def top_heads(rankings: pa.Table, k: int, lowest: bool = False, column: str = "rank") -> list[tuple[int, int]]:
    """The k best-ranked heads (or the k worst, as a control) by a rank column (`Run.rank_column` says which)."""
    rows = rankings.sort_by([(column, "descending" if lowest else "ascending")]).slice(0, k).to_pylist()
    return [(r["layer"], r["head"]) for r in rows]


def install_means(loaded: LoadedModel, run: RunDir, images: int | None = None) -> None:
    """Mean ablation (config ablation: mean): the run's means of every head's output over D become the
    substitutes of ablated heads in `loaded`'s gates, so every ablated forward of it is the run's."""
    loaded.adapter.gates.set_means([torch.from_numpy(m).float() for m in head_means(run, images)])


def decode_fg(column: pa.ChunkedArray | pa.Array, side: int) -> torch.Tensor:
    """masks/'s `fg` column (row-major side x side booleans per image) as an (N, side, side) bool tensor."""
    return torch.from_numpy(np.stack(column.to_numpy(zero_copy_only=False))).reshape(-1, side, side)


class Run:
    """A run directory with a run.json, opened for reading."""

    def __init__(self, url: str):
        self.dir = RunDir(url)
        self.dir.check(label="run")
        if not self.dir.exists("run.json"):
            raise StorageError(f"{url} is not a run directory (no run.json); run `cigma-ray scan ... --out {url}` first")
        self.url = url
        self.meta = self.dir.read_json("run.json")
        self._rankings: pa.Table | None = None

    @cached_property
    def config(self) -> Config:
        return from_dict(self.meta["config"], source=f"{self.url}/run.json")

    @property
    def heads_per_layer(self) -> list[int]:
        return self.meta["plan"]["heads_per_layer"]

    @property
    def skipped_layers(self) -> list[int]:
        """Layers whose heads cannot change the logits and were not scanned (run.json's plan.skipped_layers)."""
        return self.meta["plan"].get("skipped_layers", [])

    @property
    def n_heads(self) -> int:
        """The heads the run scanned (and ranked)."""
        return len(self.heads)

    @property
    def heads(self) -> list[tuple[int, int]]:
        """The heads the run scanned: every head but those of the skipped layers."""
        return scanned_heads(self.heads_per_layer, self.skipped_layers)

    @property
    def score(self) -> str:
        """The score the run ranks by (config key `score`)."""
        return self.meta["config"].get("score", "big_drop")

    @property
    def rounds(self) -> int:
        return self.meta["config"].get("rounds", 1)

    @property
    def adaptive(self) -> bool:
        """An adaptive scan: heads outside the top K were measured on part of D, by the run's score only."""
        return bool(self.meta["config"].get("adaptive", False))

    # -- scores and K ---------------------------------------------------------------------------
    @property
    def scores(self) -> list[str]:
        """The scores the run can rank by: the paper's, the FIG scores when its scan measured FIG^(-h), swap_drop
        when it measured SWAP^(-h); an iterative run only by the score its rounds removed heads by (other
        orders mix rounds), an adaptive one by the score it decided its top K by."""
        if self.rounds > 1 or self.adaptive:
            return [self.score]
        cfg = self.meta["config"]
        return available_scores(cfg.get("measure_fig", False), cfg.get("measure_swap", False))

    @property
    def ablation(self) -> str:
        """What an ablated head's output becomes in this run: zero (the paper's), or its mean over D."""
        return self.meta["config"].get("ablation", "zero")

    def parse_scores(self, text: str | None) -> list[str]:
        """--scores: a comma-separated subset of the run's scores (default: all of them)."""
        available = self.scores
        if text is None:
            return available
        chosen = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in chosen if x not in available]
        if bad or not chosen:
            cfg = self.meta["config"]
            missing = ["FIG^(-h) (config measure_fig: false)" if not cfg.get("measure_fig", False) else "",
                       "SWAP^(-h) (config measure_swap: false)" if not cfg.get("measure_swap", False) else ""]
            missing = [m for m in missing if m]
            why = ("its adaptive scan decided the top K by that score only" if self.adaptive else
                   f"its scan did not measure {' nor '.join(missing)}" if missing and self.rounds == 1
                   else "that is what it has")
            raise ConfigError(f"--scores {text!r}: this run can rank by {', '.join(available)} ({why})")
        return list(dict.fromkeys(chosen))

    def resolve_k(self, k: int | None, name: str = "--k", allow_zero: bool = False) -> int:
        """K as given (checked against the model's heads), or the run's top_k when None."""
        if k is None:
            return resolve_k(self.meta["config"]["top_k"], self.n_heads)
        check_k(k, self.n_heads, name, allow_zero)
        return k

    # -- rankings and masks -----------------------------------------------------------------------
    def require_rankings(self, what: str) -> None:
        """Refuse, with the command that finishes the run, when it has no rankings.parquet yet."""
        if not self.dir.exists("rankings.parquet"):
            raise StorageError(f"{self.url} has no rankings.parquet yet, so there are no top heads to {what}: "
                               f"finish the run with the scan command that made it (`cigma-ray scan --model "
                               f"{self.meta['model']['name']} --data {self.meta['data']['url']} --out {self.url} ...`; "
                               f"`cigma-ray status {self.url}` says what is missing)")

    def rankings(self) -> pa.Table:
        if self._rankings is None:
            self._rankings = self.dir.read_table("rankings.parquet")
        return self._rankings

    def rank_column(self, score: str | None = None) -> str:
        """The column that orders the heads by `score`: `rank` for the run's own score (in an iterative run, the
        order the heads were removed in, then the last round's ranking), `{score}_rank` for another score of a
        single-round run. Every command that picks heads goes through here, so all pick the same ones."""
        if score is None or score == self.score:
            return "rank"
        if score not in self.scores:
            self.parse_scores(score)  # the error that says which scores the run has
        return f"{score}_rank"

    def top_heads(self, k: int, score: str | None = None, lowest: bool = False) -> list[tuple[int, int]]:
        """The top k heads by `score` (the run's own when None), or its k lowest (a control)."""
        return top_heads(self.rankings(), k, lowest=lowest, column=self.rank_column(score))

    def masks(self, columns: list[str] | None = None) -> pa.Table:
        """masks/ of every image of D, by image id."""
        return self.dir.read_folder("masks", columns).sort_by("image_id")

    # -- the scanned model and data -------------------------------------------------------------
    def model_spec(self, checkpoint: str | None = None) -> ModelSpec:
        return scanned_model_spec(self.meta, checkpoint)

    def load_model(self, device: str = "cpu", checkpoint: str | None = None) -> LoadedModel:
        """The model the run scanned, refusing weights other than the ones its ranking belongs to."""
        spec = self.model_spec(checkpoint)
        loaded = load(spec, device, self.meta["precision"])
        if loaded.fingerprint["weights"] != self.meta["model"]["weights"]:
            raise ModelError(f"the weights loaded for {spec.name} ({loaded.fingerprint['weights']}) are not the ones "
                             f"{self.url} scanned ({self.meta['model']['weights']}); the checkpoint changed since the "
                             "scan. Pass the original file with --checkpoint")
        if self.ablation == "mean":
            install_means(loaded, self.dir, self.masks(["image_id"]).num_rows)
        return loaded

    def open_data(self) -> ImageSource:
        """The data the run scanned, refusing a listing other than the one its image ids refer to."""
        url = self.meta["data"]["url"]
        source = open_source(url)
        if source.fingerprint() != self.meta["data"]["fingerprint"]:
            raise DataError(f"{url} lists other images than when {self.url} scanned it, so image ids no longer "
                            "match; restore the data set to use this run")
        return source

    def reopen(self, device: str = "cpu", checkpoint: str | None = None) -> "Scanned":
        """The scanned model, data and a replica on `device`, as the scan had them."""
        try:
            loaded = self.load_model(device, checkpoint)
            source = self.open_data()
        except (DataError, ModelError) as e:
            raise type(e)(f"cannot rebuild the scan of {self.url} as run.json records it: {e}") from None
        return Scanned(self, loaded, source, Replica(loaded, device, self.meta["precision"], self.config.batch_size))


@dataclass
class Scanned:
    """A run with its model and data rebuilt: what evaluating or inspecting a run needs."""

    run: Run
    loaded: LoadedModel
    source: ImageSource
    replica: Replica

    @property
    def cfg(self) -> Config:
        return self.run.config

    @property
    def dir(self) -> RunDir:
        return self.run.dir

    @property
    def heads(self) -> list[tuple[int, int]]:
        """The heads the run scanned (random controls are drawn from them)."""
        return self.loaded.adapter.scanned_heads
