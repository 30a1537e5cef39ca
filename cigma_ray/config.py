"""Run configuration: the flat keys of DESIGN section 1, their defaults and their checks."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .method.scores import FIG_SCORES, SCORES, SWAP_SCORES

ABLATIONS = ("zero", "mean")  # what an ablated head's output becomes: zero (the paper's), or its mean over D
OBJECTIVES = ("conflict", "bir")  # what prune --auto-k optimises (see evaluation/autok.py)


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and the fix."""


@dataclass(frozen=True)
class Config:
    # image set D
    tp_ratio: float = 0.4
    seed: int = 0
    # mask optimisation
    mask_size: int = 32
    mask_lr: float = 0.05
    mask_steps: int = 250
    l_js: float = 1.0
    l_1: float = 0.01
    l_tv: float = 0.1
    keep_ratio: float = 0.35
    tau: float = 1.0
    mask_batch: int = 64
    mask_micro_batch: int = 0  # images per forward/backward within a mask batch (0: all of them); for memory
    mask_tol: float = 0.0  # opt-in early stop of a mask: its loss changed by less than this over mask_window steps
    mask_window: int = 10
    # scores and pruning
    bootstrap: int = 1000
    ci_level: float = 0.95
    measure_fig: bool = True  # the scan also measures FIG^(-h) (1.5x the forwards): needed by bir_drop, big_minus_fig
    measure_swap: bool = False  # ... and SWAP^(-h) on the background-swapped image (one more view): needed by swap_drop
    ablation: str = "zero"  # an ablated head's output before the output projection: zero, or its mean over D
    score: str = "big_drop"  # which score ranks the heads (rankings hold every score the scan can give)
    top_k: int | float = 16  # a count, or a fraction of all heads in (0, 1)
    max_clean_drop: float = 0.02  # prune --auto-k: the most clean accuracy a pruning may cost
    objective: str = "conflict"  # prune --auto-k: raise counterfactual conflict accuracy, or lower BIR
    rounds: int = 1  # iterative mode: scan, remove the top k_per_round heads, scan the rest again, ...
    k_per_round: int = 1
    # adaptive scan (`scan --adaptive`): the exhaustive top K with probability >= 1 - delta, for fewer forwards
    adaptive: bool = False
    delta: float = 0.05
    adaptive_first: int = 32  # images of D in the first round
    adaptive_growth: float = 1.2  # each round's images of D so far x this
    adaptive_order: str = "none"  # "screen": the gradient pre-screen's best heads are measured first
    # execution (never changes results)
    batch_size: int = 64
    unit_images: int = 64
    unit_layers: int = 0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        infinite = [f.name for f in fields(self) if isinstance(getattr(self, f.name), float)
                    and not math.isfinite(getattr(self, f.name))]
        if infinite:  # .inf passes every range check below and gives 0/1 masks; .nan fails them, but say why
            raise ConfigError(f"config value not finite: {', '.join(f'{k}={getattr(self, k)!r}' for k in infinite)} "
                              f"({'; '.join(f'{k}: {RANGES[k]}' for k in infinite)}; every number must be finite)")
        checks = {
            "tp_ratio": 0 < self.tp_ratio <= 1,
            "mask_size": self.mask_size >= 2,
            "mask_lr": self.mask_lr > 0,
            "mask_steps": self.mask_steps >= 0,
            "l_js": self.l_js >= 0,
            "l_1": self.l_1 >= 0,
            "l_tv": self.l_tv >= 0,
            "keep_ratio": 0 < self.keep_ratio < 1,
            "tau": self.tau > 0,
            "mask_batch": self.mask_batch >= 1,
            "mask_micro_batch": self.mask_micro_batch >= 0,
            "mask_tol": self.mask_tol >= 0 and math.isfinite(self.mask_tol),
            "mask_window": self.mask_window >= 1,
            "bootstrap": self.bootstrap >= 0,
            "ci_level": 0 < self.ci_level < 1,
            "score": self.score in SCORES,
            "ablation": self.ablation in ABLATIONS,
            "objective": self.objective in OBJECTIVES,
            "top_k": (self.top_k >= 1) if isinstance(self.top_k, int) else 0 < self.top_k < 1,
            "max_clean_drop": 0 <= self.max_clean_drop <= 1,
            "rounds": self.rounds >= 1,
            "k_per_round": self.k_per_round >= 1,
            "delta": 0 < self.delta < 1,
            "adaptive_first": self.adaptive_first >= 1,
            "adaptive_growth": self.adaptive_growth > 1 and math.isfinite(self.adaptive_growth),
            "adaptive_order": self.adaptive_order in ADAPTIVE_ORDERS,
            "batch_size": self.batch_size >= 1,
            "unit_images": self.unit_images >= 1,
            "unit_layers": self.unit_layers >= 0,
            "max_attempts": self.max_attempts >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if not bad and self.score in FIG_SCORES and not self.measure_fig:
            raise ConfigError(f"score={self.score!r} needs FIG^(-h) from the scan, but measure_fig is false; "
                              "set measure_fig: true, or score: big_drop")
        if not bad and self.adaptive and self.rounds > 1:
            raise ConfigError(f"adaptive: true with rounds={self.rounds}: the adaptive scan is a single scan of the "
                              "intact model; use one or the other")
        if not bad and self.score in SWAP_SCORES and not self.measure_swap:
            raise ConfigError(f"score={self.score!r} needs SWAP^(-h) from the scan, but measure_swap is false; "
                              "set measure_swap: true, or score: big_drop")
        if not bad and self.adaptive and self.adaptive_order == "screen" and self.score in SWAP_SCORES:
            raise ConfigError(f"adaptive_order: screen with score={self.score!r}: the gradient pre-screen estimates "
                              "big_drop and the FIG scores, not the background swap; use adaptive_order: none")
        if bad:
            raise ConfigError(f"config value out of range: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)} "
                              f"({'; '.join(RANGES[k] for k in bad)})")

    # Keys that change results; a run directory refuses to mix runs that differ in these.
    RESULT_KEYS = ("tp_ratio", "seed", "mask_size", "mask_lr", "mask_steps", "l_js", "l_1", "l_tv",
                   "keep_ratio", "tau", "mask_batch", "mask_micro_batch", "mask_tol", "mask_window", "bootstrap",
                   "ci_level", "measure_fig", "measure_swap", "ablation", "score", "rounds", "k_per_round", "adaptive",
                   "delta", "adaptive_first", "adaptive_growth", "adaptive_order")

    @staticmethod
    def result_keys(config: dict[str, Any]) -> tuple[str, ...]:
        """The keys that change a run's results: RESULT_KEYS, and top_k for an adaptive scan (K decides
        which heads it measures)."""
        return Config.RESULT_KEYS + (("top_k",) if config.get("adaptive") else ())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def result_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.RESULT_KEYS}

    def replace(self, **changes: Any) -> "Config":
        return from_dict({**self.to_dict(), **changes})

    def k_of(self, n_heads: int) -> int:
        """top_k as a count of heads: an integer as given, a fraction of the heads rounded half up (at least 1)."""
        return resolve_k(self.top_k, n_heads)


def resolve_k(top_k: int | float, n_heads: int, name: str = "top_k") -> int:
    """Heads to prune: a count as given; a fraction f of n_heads rounded half up, at least 1
    (0.02 of 1000 heads is 20; of 72 heads, 1.44 -> 1; 0.025 of 100, 2.5 -> 3). A count above n_heads is an error.
    The 1e-9 keeps products like 0.015 * 100 = 1.4999999999999998 rounding as the decimal 1.5 does."""
    k = max(1, math.floor(top_k * n_heads + 0.5 + 1e-9)) if isinstance(top_k, float) else top_k
    if k > n_heads:
        raise ConfigError(f"{name}={top_k}: the model has {n_heads} heads; choose at most {n_heads} "
                          f"or a fraction of the heads such as 0.02")
    return k


ADAPTIVE_ORDERS = ("none", "screen")

RANGES = {
    "tp_ratio": "a fraction in (0, 1]",
    "mask_size": "an integer >= 2",
    "mask_lr": "> 0",
    "mask_steps": "an integer >= 0",
    "l_js": ">= 0",
    "l_1": ">= 0",
    "l_tv": ">= 0",
    "keep_ratio": "a fraction in (0, 1)",
    "tau": "> 0",
    "mask_batch": "images whose masks are optimised together, an integer >= 1",
    "mask_micro_batch": "images per forward and backward within a mask batch, for memory, an integer >= 0 "
                        "(0 = the whole mask batch)",
    "mask_tol": "a loss change >= 0: a mask stops once its loss changed by less than this over mask_window steps "
                "(0 = off: every mask takes mask_steps steps)",
    "mask_window": "steps over which mask_tol compares the loss, an integer >= 1",
    "bootstrap": "resamples, an integer >= 0",
    "ci_level": "in (0, 1)",
    "score": "one of big_drop (the paper's: mean drop in BIG), bir_drop (mean drop in BIR), big_minus_fig "
             "(drop in BIG minus drop in FIG), swap_drop (mean drop in SWAP, the prediction's shift when another "
             "class's background is swapped in)",
    "measure_fig": "true or false",
    "measure_swap": "true or false",
    "ablation": "zero (an ablated head's output is zero, the paper's) or mean (its mean over the images of D and "
                "their tokens, on the intact model)",
    "objective": "conflict (prune --auto-k raises counterfactual conflict accuracy) or bir (lowers mean BIR)",
    "top_k": "a count of heads (an integer >= 1) or a fraction of all heads in (0, 1), e.g. 0.02",
    "max_clean_drop": "a fraction in [0, 1]",
    "rounds": "scan rounds, an integer >= 1 (1 = the paper's single scan)",
    "k_per_round": "heads removed after each round but the last, an integer >= 1",
    "adaptive": "true or false",
    "delta": "the adaptive scan's error probability, in (0, 1)",
    "adaptive_first": "images of D in the adaptive scan's first round, an integer >= 1",
    "adaptive_growth": "> 1: each adaptive round ends at this many times the images of the round before",
    "adaptive_order": "none, or screen (the gradient pre-screen's best heads are measured first)",
    "batch_size": "an integer >= 1",
    "unit_images": "an integer >= 1",
    "unit_layers": "an integer >= 0 (0 = all layers in one unit)",
    "max_attempts": "tries per unit (on a cluster; in this process after storage errors) before it is given up, "
                    "an integer >= 1",
}


def from_dict(values: dict[str, Any], source: str = "config") -> Config:
    """Build a Config, rejecting unknown keys and values of the wrong type by name."""
    known = {f.name: f for f in fields(Config)}
    unknown = sorted(str(k) for k in set(values) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(known)}")
    typed: dict[str, Any] = {}
    for key, value in values.items():
        want = type(getattr(Config, key))
        if key == "top_k" and isinstance(value, float) and not isinstance(value, bool):
            if value >= 1:
                raise ConfigError(f"{source}: top_k={value!r}: write a count as an integer (e.g. 16) or a fraction "
                                  "of all heads below 1 (e.g. 0.02)")
            want = float
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) != (want is bool) or not isinstance(value, want):
            raise ConfigError(f"{source}: {key}={value!r} must be {want.__name__} ({RANGES[key]})")
        typed[key] = value
    try:
        return Config(**typed)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load(path: str | Path | None = None, **overrides: Any) -> Config:
    """Load a YAML file of flat keys (missing file or bad YAML is a ConfigError), then apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file {p} is a directory; pass --config with a YAML file of flat keys")
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass --config with a YAML file of flat keys")
        try:
            loaded = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"config file {p} is not a text file (not UTF-8); pass --config with a YAML file of "
                              "flat keys, e.g. 'mask_steps: 100'") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = " ".join(str(getattr(e, "problem", None) or e).split())
            raise ConfigError(f"config file {p} is not valid YAML: {what}{where}") from None
        except OSError as e:
            raise ConfigError(f"config file {p} cannot be read ({e.strerror or e})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must be a mapping of keys to values, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides)
    return from_dict(values, source=str(path) if path else "config")
