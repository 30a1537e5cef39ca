"""Adaptive scan: the exhaustive top-K heads for a fraction of the ablated forwards (pure math, numpy only).

A head's score is the mean over the N images of D of a bounded per-image term (`method.scores`).
The images are visited in an order fixed before the scan (below), in rounds of growing size; after each
round every head measured gets an interval that holds, with probability at least 1 - delta for all heads
and all rounds together, the head's exhaustive score (its mean over all N images of D).

Per-image bounds and the heavy images first
-------------------------------------------
The mask stage measured BIG_i (and FIG_i) of every image of D before the scan, and they bound every head's
term on image i (`term_bounds`): big_drop = BIG_i - BIG_i^(-h) lies in [BIG_i - ln 2, BIG_i], so an image
whose prediction barely depends on its background cannot hold a large drop for any head. The range of the
term, not its spread, is what keeps a head that barely matters in the scan (a bound valid for every
population must allow for a few unseen images at the range's end), so the order starts with the `heavy`
images of the largest upper bounds (`heavy_count`: a cost model on the bounds alone), measured exactly for
every head, and then visits the other N_L images in a seeded uniformly random order. A head's interval after
n images is then (its heavy images' terms, exactly, plus N_L x the confidence sequence's interval for the
mean of its light images, whose range is the light images' bounds) / N, intersected with the deterministic
interval of its seen terms plus the unseen images' own bounds. On the demo (BIG below 2e-4 on 73%
of D) this turns a scan that could decide nothing before D was exhausted into one that needs about
half the forwards. Without bounds (bir_drop) there are no heavy images and every image has the score's range.

Leaders
-------
Each head's confidence sequence is valid uniformly over its own number of images, so how far each head is
measured may depend on anything seen so far. A head leaves once its upper end is below the K-th largest
lower end, so the scan measures the K undecided heads of the highest running means (the leaders; in the
first round, the given `lead`, e.g. the pre-screen's best) LEAD_AHEAD slots of the schedule ahead of the
rest: their lower ends rise early, and the rest leave sooner.

Bound: a betting confidence sequence for sampling without replacement
---------------------------------------------------------------------
Waudby-Smith & Ramdas (WSR), "Confidence sequences for sampling without replacement", NeurIPS 2020
(arXiv:2006.04347), and "Estimating means of bounded random variables by betting", JRSS-B 2023
(arXiv:2010.09686): capital processes for sampling without replacement, predictable plug-in bets.

Rescale a head's terms on the light images to z = (x - low) / (high - low) in [0, 1] (low, high: the
light images' bounds). The population z_1..z_N has mean mu (N here: the light images); the images
are drawn uniformly without replacement, Z_1, Z_2, .... For a candidate mean m, if mu = m then
the mean of the images not drawn yet is

    mu_t(m) = (N m - (Z_1 + ... + Z_{t-1})) / (N - t + 1),   and E[Z_t | Z_1..Z_{t-1}] = mu_t(m).

The capital of a gambler who bets the fraction lambda_t >= 0 (chosen from Z_1..Z_{t-1} only) on
"the mean is above m",

    K+_t(m) = prod_{i<=t} (1 + lambda_i (Z_i - mu_i(m))),   lambda_i = min(l_i, c_max / mu_i(m)),

is then a nonnegative martingale with K+_0 = 1 (each factor has conditional mean 1 and is at
least 1 - c_max > 0), so by Ville's inequality P(exists t: K+_t(mu) >= 2/alpha) <= alpha/2. The
same holds for K-_t(m) = prod (1 - lambda_i (Z_i - mu_i(m))) with lambda_i = min(l_i, c_max / (1 - mu_i(m))).
Hence, simultaneously for every t (anytime, no matter when the scan looks or stops),

    mu in C_t = {m : K+_t(m) < 2/alpha and K-_t(m) < 2/alpha}   with probability >= 1 - alpha.

Each factor of K+ is nonincreasing in m (mu_i(m) grows with m; where the cap is active the factor
is 1 - c_max + c_max Z_i / mu_i(m)), and each factor of K- nondecreasing, so C_t is an interval,
found by bisection (the reported ends are rounded outwards). m is also restricted to the values
the population allows at all, mu_i(m) in [0, 1], which is the deterministic interval

    [(Z_1 + ... + Z_t) / N, (Z_1 + ... + Z_t + N - t) / N]   (the unseen images at 0, or at 1),

so at t = N the interval is the exact mean. The bets l_i are WSR's predictable plug-in
(PrPl): l_t = sqrt(2 log(2/alpha) / (s2_{t-1} t log(1 + t))) with the running
regularised variance s2_t = (1/4 + sum_{i<=t} (Z_i - zbar_i)^2) / (t + 1),
zbar_t = (1/2 + sum_{i<=t} Z_i) / (t + 1). c_max (`bet_cap`, default 0.9; WSR use 1/2 to 3/4)
keeps every factor at least 1 - c_max > 0; any cap below 1 keeps the guarantee. Where the terms
vary little (bulk heads: a per-image spread of about 0.01 in a range of 1.4) the cap, not the
plug-in, sets the bet, and the interval's half-width is then about
(distance from the mean to the range's end) x log(2/alpha) / (c_max n), some 7/n for big_drop
with 320 heads: no bound that holds for every population can do much better, since a few
images with extreme terms cannot be ruled out from fewer than about that many draws. Intervals of
successive rounds are intersected (the running intersection of a confidence sequence is one too).

Union over heads: alpha = delta / H for each of the H heads. The confidence sequence is uniform
over time, so no union over rounds is needed; the result holds at every round.

`bound="hoeffding_serfling"` instead uses the Hoeffding-Serfling inequality of Bardenet &
Maillard, "Concentration inequalities for sampling without replacement", Bernoulli 21(3), 2015,
corollary 2.5: with probability >= 1 - d, |mean of n - mu| <= (high - low) sqrt(rho_n log(2/d) / (2n)),
rho_n = 1 - (n - 1)/N for n <= N/2 and (1 - n/N)(1 + 1/n) above, with a union bound over heads
and rounds (d = delta / (H x rounds)). It needs no bisection but ignores the variance, so on CIGMA
terms (typically 1e-3 against a range of 1.4) it decides little before the end; it is kept as
the textbook baseline.

Decision rule (successive elimination for top-K identification): with every interval covering its
head's exhaustive score, a head whose upper end is below the K-th largest lower end has K heads
surely above it (surely out); a head whose lower end is above the (K+1)-th largest upper end has
at most K - 1 other heads that can reach it (surely in). Decided heads leave the scan; the scan
stops when K heads are in or all but K are out; when D is exhausted the intervals are the exact
means and the rest is decided by them, with ties broken as the exhaustive ranking breaks them
(lower head index first; `scores.ranks`). So with probability at least 1 - delta the adaptive
top-K set is the exhaustive scan's top-K set on the same D and masks (the probability is over
the seeded visiting order of the light images; D, its masks and every term are fixed, and so are the heavy
images, chosen from the masks alone).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .fidelity import top

LN2 = math.log(2.0)

# Range of each score's per-(head, image) term (method.scores.score_terms).
SCORE_RANGES = {
    "big_drop": (-LN2, LN2),  # BIG_i - BIG_i^(-h), both JS divergences in [0, ln 2]
    "bir_drop": (-1.0, 1.0),  # BIR_i - BIR_i^(-h), both in [0, 1]
    "big_minus_fig": (-2 * LN2, 2 * LN2),
}
BOUNDS = ("betting", "hoeffding_serfling")
BOUND_TOL = 1e-5  # JS values are computed in fp32: an ablated BIG can come out a few 1e-8 below 0 or above ln 2
THETA_SHARE = 0.1  # heavy_count's guess of the K-th score, as a share of the mean per-image upper bound
LEAD_AHEAD = 8  # slots of the schedule the current leaders are measured ahead of the rest (x1.2 each: about 4.3x)


def round_ends(n_images: int, first: int = 32, growth: float = 1.2) -> list[int]:
    """Images seen by the end of each round: first, then growing geometrically by `growth`, ending at N.

    E.g. N=1000, first=32, growth=1.5: 32, 48, 72, 108, 162, 243, 364, 546, 819, 1000. The betting
    bound is uniform over time, so more rounds cost no confidence, only driver round trips; a head
    leaves at most (growth - 1) x the images it needed too late. Default 1.2: 20 rounds for N = 2000.
    """
    if n_images < 1:
        raise ValueError("an adaptive scan needs at least one image")
    if first < 1 or growth <= 1:
        raise ValueError(f"round schedule: first={first} must be >= 1 and growth={growth} > 1")
    ends, n = [], float(min(first, n_images))
    while True:
        end = min(n_images, max(int(round(n)), ends[-1] + 1 if ends else 1))
        ends.append(end)
        if end == n_images:
            return ends
        n = end * growth


def visit_order(n_images: int, seed: int, high: np.ndarray | None = None, heavy: int = 0) -> np.ndarray:
    """The order in which the images of D (positions 0..N-1) are visited: the `heavy` images with the largest
    upper bounds `high` first (largest first, ties to the lower position), then the rest in a seeded uniformly
    random order (with heavy = 0, all of D)."""
    rest = np.arange(n_images)
    first = np.zeros(0, dtype=np.int64)
    if heavy:
        first = np.argsort(-np.asarray(high, np.float64), kind="stable")[:heavy]
        rest = np.setdiff1d(rest, first)
    return np.concatenate([first, rest[np.random.default_rng([seed, 0x13]).permutation(len(rest))]])


def term_bounds(score: str, big: np.ndarray | None = None, fig: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray] | None:
    """(low_i, high_i) per image of D: bounds every head's term obeys on image i, known before the scan from the
    mask stage's BIG_i (and FIG_i), or None where there are none but the score's range (SCORE_RANGES).

    big_drop = BIG_i - BIG_i^(-h) with BIG_i^(-h) a JS divergence in [0, ln 2]: in [BIG_i - ln 2, BIG_i], so an
    image the prediction barely depends on the background of cannot hold a large drop for any head.
    big_minus_fig: in [BIG_i - FIG_i - ln 2, BIG_i - FIG_i + ln 2]. bir_drop has none: a ratio of two JS values near
    0 can leave [0, 1] by rounding. Each bound is widened by BOUND_TOL for the fp32 rounding of the JS values;
    a measured term outside it is an error (`AdaptiveTopK.update`), never clipped.
    """
    if score not in SCORE_RANGES:
        raise ValueError(f"unknown score {score!r}; one of {', '.join(SCORE_RANGES)}")
    if big is None or score == "bir_drop" or (score == "big_minus_fig" and fig is None):
        return None
    centre = np.asarray(big, np.float64)
    if score == "big_drop":
        low, high = centre - LN2, centre
    else:
        centre = centre - np.asarray(fig, np.float64)
        low, high = centre - LN2, centre + LN2
    return low - BOUND_TOL, high + BOUND_TOL


def heavy_count(high: np.ndarray, n_heads: int, delta: float, bet_cap: float = 0.9) -> int:
    """How many images of D, those with the largest upper bounds, every head is measured on first (see the module
    docstring). A cost model on the bounds alone, so it changes what a scan costs, never what it finds: a head
    scoring about 0 leaves once its upper bound is below the K-th score theta; with the first n images measured
    exactly, the rest need about (share of D left) x (their largest bound) x log(2H / delta) / (bet_cap x theta)
    images. theta, unknown before the scan, is taken as THETA_SHARE of the mean bound (0.12 on the 320-head
    reference run, 0.02 on the demo). The n with the least images in all."""
    high = np.sort(np.maximum(np.asarray(high, np.float64), 0.0))[::-1]
    n_images = len(high)
    theta = THETA_SHARE * high.mean() if n_images else 0.0
    if theta <= 0:
        return 0
    n = np.arange(n_images)
    rest = (n_images - n) / n_images * high * math.log(2 * n_heads / delta) / (bet_cap * theta)
    return int(np.argmin(n + np.minimum(n_images - n, rest)))


# -- bounds on the mean of a finite population in [0, 1] ------------------------------------------
def _deterministic(z: np.ndarray, n_total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sum, low, high) per row of z (heads, n) in [0, 1]: the interval every population allows, with the
    N - n unseen images all at 0 or all at 1 (the exact mean once n = N)."""
    total = z.sum(axis=1)
    return total, total / n_total, (total + (n_total - z.shape[1])) / n_total


def plugin_bets(z: np.ndarray, alpha: float) -> np.ndarray:
    """WSR's predictable plug-in bets l_t (t = 1..n) for rows of z in visiting order; l_t uses z_1..z_{t-1} only."""
    h, n = z.shape
    t = np.arange(1, n + 1, dtype=np.float64)
    zbar = (0.5 + np.cumsum(z, axis=1)) / (t + 1)
    s2 = (0.25 + np.cumsum((z - zbar) ** 2, axis=1)) / (t + 1)
    s2_prev = np.concatenate([np.full((h, 1), 0.25), s2[:, :-1]], axis=1)
    return np.sqrt(2 * math.log(2 / alpha) / (s2_prev * t * np.log1p(t)))


def _log_capital(scale, shift, centred, bets, m, cap, upper: bool) -> np.ndarray:
    """log K+_t(m) (upper=False: evidence the mean is above m) or log K-_t(m) (upper=True), per row.

    With mu_i(m) = m * scale_i - shift_i (scale = N / (N - i + 1), shift = S_{i-1} / (N - i + 1))
    and Z_i - mu_i(m) = centred_i - m * scale_i (centred = Z_i + shift_i), precomputed per row.
    """
    ms = m[:, None] * scale
    mu = np.clip(ms - shift, 0.0, 1.0)
    d = centred - ms
    with np.errstate(divide="ignore"):
        if upper:
            np.subtract(1.0, mu, out=mu)
            lam = np.minimum(bets, np.divide(cap, mu, out=mu))
            np.negative(d, out=d)
        else:
            lam = np.minimum(bets, np.divide(cap, mu, out=mu))
    np.multiply(lam, d, out=d)
    return np.log1p(d, out=d).sum(axis=1)


def betting_interval(z: np.ndarray, n_total: int, alpha: float, bet_cap: float = 0.9,
                     low_hint: np.ndarray | None = None, high_hint: np.ndarray | None = None,
                     rel_tol: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of the without-replacement betting confidence sequence at time n, per row of
    z (heads, n) in [0, 1] in visiting order, from a population of n_total; see the module docstring.

    Valid at every n simultaneously with probability >= 1 - alpha per row. Each end is the root of
    a monotone function of m, found by bisection to `rel_tol` of its distance from the sample mean
    and rounded outwards (so it is slightly wider than exact, never narrower). `low_hint`,
    `high_hint`: an earlier round's interval, intersected with this one (the running intersection
    of a confidence sequence is one too); where this round's does not reach past a hint, no search.
    """
    z = np.asarray(z, np.float64)
    h, n = z.shape
    total, det_low, det_high = _deterministic(z, n_total)
    if n == n_total or h == 0:
        return det_low, det_high
    mean = np.clip(total / n, det_low, det_high)
    low0 = det_low if low_hint is None else np.clip(low_hint, det_low, det_high)
    high0 = det_high if high_hint is None else np.clip(high_hint, det_low, det_high)
    bets = plugin_bets(z, alpha)
    left = (n_total - np.arange(n, dtype=np.float64))[None, :]
    scale = n_total / left
    shift = np.concatenate([np.zeros((h, 1)), np.cumsum(z, axis=1)[:, :-1]], axis=1) / left
    centred = z + shift
    threshold = math.log(2 / alpha)

    def rejects(rows, m, upper):
        return _log_capital(scale, shift[rows], centred[rows], bets[rows], m, bet_cap, upper) >= threshold

    every = np.arange(h)
    ends = []
    for upper, start, far in ((False, low0, det_high), (True, high0, det_low)):
        out = start.copy()
        todo = every[rejects(every, start, upper)]  # elsewhere the end lies beyond the hint: keep the hint
        if len(todo):
            inner = rejects(todo, mean[todo], upper)  # the sample mean is rejected too: search up to the far end
            if inner.any():
                all_out = rejects(todo[inner], far[todo[inner]], upper)  # everything rejected (prob <= alpha/2)
                out[todo[inner][all_out]] = far[todo[inner][all_out]]
                keep = np.ones(len(todo), dtype=bool)
                keep[np.flatnonzero(inner)[all_out]] = False
            else:
                keep = np.ones(len(todo), dtype=bool)
            rows = todo[keep]
            a = start[rows]  # rejected
            b = np.where(inner[keep], far[rows], mean[rows])  # not rejected
            size = np.abs(mean[rows] - a)
            while len(rows) and (np.abs(b - a) > rel_tol * size + 1e-15).any():
                mid = 0.5 * (a + b)
                r = rejects(rows, mid, upper)
                a, b = np.where(r, mid, a), np.where(r, b, mid)
            out[rows] = a  # the rejected side: rounded outwards
        ends.append(out)
    return ends[0], ends[1]


def hoeffding_serfling_interval(z: np.ndarray, n_total: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) from Bardenet & Maillard's Hoeffding-Serfling bound (corollary 2.5) at level alpha
    (alpha/2 a side), for rows of z (heads, n) in [0, 1], intersected with the deterministic interval."""
    z = np.asarray(z, np.float64)
    h, n = z.shape
    total, det_low, det_high = _deterministic(z, n_total)
    if n == n_total or h == 0:
        return det_low, det_high
    rho = 1 - (n - 1) / n_total if n <= n_total / 2 else (1 - n / n_total) * (1 + 1 / n)
    eps = math.sqrt(rho * math.log(2 / alpha) / (2 * n))
    mean = total / n
    return np.maximum(det_low, mean - eps), np.minimum(det_high, mean + eps)


# -- top-K identification ----------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """Part of a round: these heads (indices 0..H-1) on the images of slots start..stop-1 of the schedule
    (positions 0..N-1 of D, in visiting order: order[ends[start - 1]:ends[stop - 1]], from 0 when start = 0)."""

    heads: np.ndarray
    images: np.ndarray
    start: int
    stop: int


@dataclass(frozen=True)
class Round:
    """What the scan measures next: one block per (slots done, slots to reach) pair of its heads."""

    index: int
    blocks: tuple[Block, ...]

    @property
    def pairs(self) -> int:
        return sum(len(b.heads) * len(b.images) for b in self.blocks)


@dataclass
class AdaptiveResult:
    """Per head (arrays of length H): the estimate of its exhaustive score from the n images it was measured on
    and its standard error (`AdaptiveTopK.estimates`; the exhaustive score where n = N), n, the interval used to
    decide, and how it was decided."""

    k: int
    top_k: np.ndarray  # the K head indices, best mean first
    mean: np.ndarray
    stderr: np.ndarray
    n: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    decided: np.ndarray  # "in" / "out": decided by the bounds before D was exhausted; "": by the exhaustive means
    decided_round: np.ndarray  # the round after which it was decided (-1: never decided early)
    in_top_k: np.ndarray
    rank: np.ndarray  # 1..H: the top K by mean, then the rest by mean (its order is approximate)
    pairs: int  # (head, image) pairs measured
    exhaustive_pairs: int
    rounds: int
    n_images: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def saving(self) -> float:
        """Exhaustive pairs / pairs measured (the same ratio for forwards, at 2 or 3 views per pair)."""
        return self.exhaustive_pairs / max(1, self.pairs)

    def columns(self) -> dict[str, np.ndarray]:
        """The per-head columns a ranking needs, in head order (join with layer and head there)."""
        return {"score": self.mean, "n": self.n, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "decided": self.decided, "decided_round": self.decided_round, "in_top_k": self.in_top_k,
                "rank": self.rank}


class AdaptiveTopK:
    """The state of an adaptive scan of H heads over the N images of D, for the top K.

    The driver asks `next_round()` which heads to measure on which images, measures the score's
    per-(head, image) terms for exactly those (any order of work, any replicas), and hands them to
    `update(values)` as one (len(block.heads), len(block.images)) array per block, in the round's order. It
    stops when `next_round()` returns None; `result()` then holds the top K and every head's numbers. The
    state is a pure function of the values given, so replaying the rounds from stored deltas rebuilds it
    (resume).

    low, high: the range of the per-image terms (SCORE_RANGES); bounds: (low_i, high_i) per image of D in D
    order (`term_bounds`), or None. With bounds, the heavy images (`heavy_count`, or `heavy`) are visited
    first. lead: the leaders of the first round (e.g. the pre-screen's best); later rounds lead with the K open
    heads of the highest running means, lead_ahead slots ahead of the rest (0: every head in step).
    measure_in: keep measuring heads decided in until the end (their exact scores and order, for K x N more pairs).
    """

    def __init__(self, n_heads: int, n_images: int, k: int, *, low: float, high: float, delta: float = 0.05,
                 seed: int = 0, first: int = 32, growth: float = 1.2,
                 bounds: tuple[np.ndarray, np.ndarray] | None = None, heavy: int | None = None,
                 bound: str | Callable = "betting", bet_cap: float = 0.9, measure_in: bool = False,
                 lead: np.ndarray | None = None, lead_ahead: int = LEAD_AHEAD):
        if not 1 <= k <= n_heads:
            raise ValueError(f"top K={k} must be between 1 and the number of heads ({n_heads})")
        if not 0 < delta < 1:
            raise ValueError(f"delta={delta} must be in (0, 1)")
        if not high > low:
            raise ValueError(f"range [{low}, {high}] is empty")
        if not callable(bound) and bound not in BOUNDS:
            raise ValueError(f"bound={bound!r}: one of {', '.join(BOUNDS)}")
        if not 0 < bet_cap < 1:
            raise ValueError(f"bet_cap={bet_cap} must be in (0, 1)")
        if lead_ahead < 0:
            raise ValueError(f"lead_ahead={lead_ahead} must be >= 0")
        self.n_heads, self.n_images, self.k = n_heads, n_images, k
        self.low, self.high, self.delta = float(low), float(high), float(delta)
        self.bound, self.bet_cap, self.measure_in = bound, bet_cap, measure_in
        self.image_low, self.image_high = np.full(n_images, self.low), np.full(n_images, self.high)
        if bounds is not None:
            if any(np.shape(b) != (n_images,) for b in bounds):
                raise ValueError(f"bounds must have one (low, high) per image ({n_images}), got "
                                 f"{[np.shape(b) for b in bounds]}")
            self.image_low = np.maximum(np.asarray(bounds[0], np.float64), self.low - BOUND_TOL)
            self.image_high = np.minimum(np.asarray(bounds[1], np.float64), self.high + BOUND_TOL)
            if heavy is None:
                heavy = heavy_count(self.image_high, n_heads, delta, bet_cap)
        self.bounded = bounds is not None  # measured terms are checked against the bounds (else clipped to the range)
        self.heavy = int(heavy or 0)
        if not 0 <= self.heavy < max(1, n_images):
            raise ValueError(f"heavy={heavy} must be in [0, {n_images})")
        self.order = visit_order(n_images, seed, self.image_high, self.heavy)
        light = self.order[self.heavy:]
        self.light_range = (float(self.image_low[light].min()), float(self.image_high[light].max()))
        # what the images not seen yet can add at least and at most, for every prefix of the order
        self.unseen_low = np.concatenate([np.cumsum(self.image_low[self.order][::-1])[::-1], [0.0]])
        self.unseen_high = np.concatenate([np.cumsum(self.image_high[self.order][::-1])[::-1], [0.0]])
        self.ends = [self.heavy + e for e in round_ends(n_images - self.heavy, first, growth)]
        self.lead = np.zeros(0, dtype=np.int64) if lead is None else np.asarray(lead, dtype=np.int64)
        self.lead_ahead = lead_ahead
        self.round = 0  # rounds done
        self.values = np.full((n_heads, n_images), np.nan)  # terms measured, in D order
        self.n = np.zeros(n_heads, dtype=np.int64)
        self.level = np.zeros(n_heads, dtype=np.int64)  # slots of the schedule measured
        self.ci_low = np.full(n_heads, self.image_low.mean())
        self.ci_high = np.full(n_heads, self.image_high.mean())
        self.decided = np.full(n_heads, "", dtype="<U3")
        self.decided_round = np.full(n_heads, -1, dtype=np.int64)
        self.member = np.zeros(n_heads, dtype=bool)  # in the top K (known once settled)
        self.pairs = 0
        self.settled = False  # the top-K set is known
        self.finished = False  # and nothing is left to measure
        self._next: Round | None = None  # the round next_round() names, until update() takes its values
        # per-head level: union over heads (the confidence sequence is uniform over rounds); the
        # Hoeffding-Serfling bound also needs the union over each head's looks (one per slot)
        self.alpha = delta / n_heads / (1 if bound == "betting" else len(self.ends))

    # -- what to measure --------------------------------------------------------------------
    def measured_heads(self) -> np.ndarray:
        """Heads still to measure: those undecided (and those in the top K, with measure_in) short of N images."""
        keep = (self.decided == "") & (not self.settled)
        if self.measure_in:
            keep |= self.member
        return np.flatnonzero(keep & (self.level < len(self.ends)))

    def leaders(self) -> np.ndarray:
        """The heads measured ahead this round: the given leaders first, then the K undecided heads of the highest
        running means (ties to the lower index), so the K-th lower bound rises early and the rest leave sooner."""
        if not self.lead_ahead:
            return np.zeros(0, dtype=np.int64)
        if self.round == 0:
            return self.lead
        open_ = np.flatnonzero((self.decided == "") & (self.n > 0))
        return open_[np.argsort(-self.estimates(open_)[0], kind="stable")[: self.k]]

    def next_round(self) -> Round | None:
        """Every head still measured one slot past the slowest one's level, the leaders lead_ahead slots further.
        A pure function of the state, which only update() changes: computed once per round."""
        if self.finished:
            return None
        if self._next is None:
            self._next = self._plan_round()
        return self._next

    def _plan_round(self) -> Round:
        heads = self.measured_heads()
        slots = len(self.ends)
        step = min(slots, int(self.level[heads].min()) + 1)
        target = np.where(np.isin(heads, self.leaders()), min(slots, step + self.lead_ahead), step)
        move = target > self.level[heads]
        heads, target = heads[move], target[move]
        blocks = []
        for start, stop in sorted({(int(self.level[h]), int(t)) for h, t in zip(heads, target)}):
            mine = heads[(self.level[heads] == start) & (target == stop)]
            images = self.order[(self.ends[start - 1] if start else 0): self.ends[stop - 1]].copy()
            blocks.append(Block(mine, images, start, stop))
        return Round(self.round, tuple(blocks))

    # -- one round's results ------------------------------------------------------------------
    def update(self, values) -> Round | None:
        """Take the terms of the round `next_round()` named (one (heads, images) array per block, in the blocks'
        order; a single array for a one-block round), update intervals and decisions; the next round or None."""
        spec = self.next_round()
        if spec is None:
            raise RuntimeError("the adaptive scan is finished; no round to update")
        if isinstance(values, np.ndarray):
            values = [values]
        if len(values) != len(spec.blocks):
            raise ValueError(f"round {spec.index}: expected values for {len(spec.blocks)} block(s), got {len(values)}")
        arrays = []
        for block, v in zip(spec.blocks, values):
            v = np.asarray(v, np.float64)
            if v.shape != (len(block.heads), len(block.images)):
                raise ValueError(f"round {spec.index}: expected values of shape {(len(block.heads), len(block.images))} "
                                 f"(heads x images), got {v.shape}")
            if np.isnan(v).any():
                raise ValueError(f"round {spec.index}: values hold NaN")
            outside = self.bounded and ((v < self.image_low[block.images]) | (v > self.image_high[block.images]))
            if np.any(outside):
                i, j = np.argwhere(outside)[0]
                image = block.images[j]
                raise ValueError(f"round {spec.index}: head {block.heads[i]}'s term on image {image} of D is {v[i, j]!r}, "
                                 f"outside [{self.image_low[image]!r}, {self.image_high[image]!r}], the bounds its mask "
                                 "stage values allow; the scan's BIG/FIG are not the mask stage's")
            arrays.append(v)
        for block, v in zip(spec.blocks, arrays):
            self.values[np.ix_(block.heads, block.images)] = v
            self.pairs += v.size
            n = self.ends[block.stop - 1]
            self.n[block.heads] = n
            self.level[block.heads] = block.stop
            self._bound(block.heads, n)
        for final in (False, True):  # the bounds' rule while a head is short of N; then, once all are at N, the means'
            open_ = self.decided == ""
            if not self.settled and final == bool((self.n[open_] == self.n_images).all()):
                self._decide(final=final)
        self.round += 1
        self.finished = not len(self.measured_heads())
        self._next = None
        return self.next_round()

    def _bound(self, heads: np.ndarray, n: int) -> None:
        """Intervals of heads measured on the first n images of the order: the heavy images' terms exactly, the
        rest's mean from the confidence sequence over the light images, intersected with what the unseen images'
        bounds allow."""
        if not len(heads):
            return
        total = self.n_images
        seen = self.values[np.ix_(heads, self.order[:n])]
        if n == total:  # the exact mean, summed as the exhaustive ranking sums it
            lo = hi = self.values[heads].mean(axis=1)
        else:
            lo = (seen.sum(axis=1) + self.unseen_low[n]) / total
            hi = (seen.sum(axis=1) + self.unseen_high[n]) / total
            if n > self.heavy:
                lo, hi = self._light_interval(heads, seen, lo, hi)
        new_low, new_high = np.maximum(self.ci_low[heads], lo), np.minimum(self.ci_high[heads], hi)
        crossed = new_low > new_high  # only where an interval missed (probability <= delta): keep the newest
        self.ci_low[heads] = np.where(crossed, lo, new_low)
        self.ci_high[heads] = np.where(crossed, hi, new_high)

    def _light_interval(self, heads, seen, lo, hi):
        """(lo, hi) of the heads' means with the light images' part bounded by the confidence sequence."""
        total, heavy = self.n_images, self.heavy
        n_light = total - heavy
        fixed = seen[:, :heavy].sum(axis=1)
        light_low, light_high = self.light_range
        width = light_high - light_low
        z = np.clip((seen[:, heavy:] - light_low) / width, 0.0, 1.0)

        def to_z(interval_end):  # a head's mean -> its light images' mean, rescaled
            return ((interval_end * total - fixed) / n_light - light_low) / width

        if self.bound == "betting":
            parts = []
            step = max(1, 4_000_000 // max(1, z.shape[1]))  # rows per block: bounded memory for big populations
            hint_low, hint_high = to_z(self.ci_low[heads]), to_z(self.ci_high[heads])
            for s in range(0, len(heads), step):
                parts.append(betting_interval(z[s: s + step], n_light, self.alpha, self.bet_cap,
                                              hint_low[s: s + step], hint_high[s: s + step]))
            a, b = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        else:
            interval = hoeffding_serfling_interval if self.bound == "hoeffding_serfling" else self.bound
            a, b = interval(z, n_light, self.alpha)
        a = (fixed + n_light * (a * width + light_low)) / total
        b = (fixed + n_light * (b * width + light_low)) / total
        return np.maximum(lo, a), np.minimum(hi, b)

    def _decide(self, final: bool) -> None:
        """The elimination rule on every undecided head; settles the set when it is known."""
        k, h = self.k, self.n_heads
        open_ = self.decided == ""
        if final:  # exact means: the exhaustive ranking's order, ties to the lower index
            idx = np.flatnonzero(open_)
            idx = idx[np.argsort(-self.ci_low[idx], kind="stable")]
            self.member[idx[: k - int(self.member.sum())]] = True
            self.settled = True
            return
        if k < h:
            kth_low = np.sort(self.ci_low)[::-1][k - 1]
            k1th_high = np.sort(self.ci_high)[::-1][k]
            self._mark(open_ & (self.ci_low > k1th_high), "in")
            self._mark(open_ & (self.ci_high < kth_low), "out")
        else:
            self._mark(open_, "in")
        n_in, n_out = int((self.decided == "in").sum()), int((self.decided == "out").sum())
        rest = self.decided == ""
        if n_in == k:  # the rest cannot be in
            self._mark(rest, "out")
        elif n_out == h - k:  # the rest must be in
            self._mark(rest, "in")
        else:
            return
        self.settled = True

    def _mark(self, mask: np.ndarray, label: str) -> None:
        self.decided[mask] = label
        self.decided_round[mask] = self.round
        if label == "in":
            self.member[mask] = True

    def estimates(self, heads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, standard error) per head of its exhaustive score from the images it was measured on: the heavy
        images' terms exactly plus N_L x the mean of its light images (a uniform sample of them, so unbiased;
        the standard error with the finite-population factor); at n = N the exact mean (summed as the
        exhaustive ranking sums it) and std / sqrt(N). NaN where a head has no images (or one, for the error)."""
        total, heavy = self.n_images, self.heavy
        mean, stderr = np.full(len(heads), np.nan), np.full(len(heads), np.nan)
        for i, head in enumerate(heads):
            n = int(self.n[head])
            if n == total:
                mean[i] = self.values[head].mean()
                stderr[i] = self.values[head].std(ddof=1) / math.sqrt(n) if n > 1 else np.nan
            elif n:
                seen = self.values[head, self.order[:n]]
                light, n_light = seen[heavy:], total - heavy
                mean[i] = (seen[:heavy].sum() + n_light * light.mean()) / total
                if len(light) > 1:
                    stderr[i] = (n_light / total * light.std(ddof=1) / math.sqrt(len(light))
                                 * math.sqrt(1 - len(light) / n_light))
        return mean, stderr

    def result(self) -> AdaptiveResult:
        if not self.finished:
            raise RuntimeError("the adaptive scan is not finished; call update() until next_round() is None")
        members = self.member.copy()
        mean, stderr = self.estimates(np.arange(self.n_heads))
        top = np.flatnonzero(members)
        top = top[np.argsort(-mean[top], kind="stable")]
        rest = np.flatnonzero(~members)
        rest = rest[np.argsort(-mean[rest], kind="stable")]
        rank = np.empty(self.n_heads, dtype=np.int64)
        rank[np.concatenate([top, rest])] = np.arange(1, self.n_heads + 1)
        return AdaptiveResult(k=self.k, top_k=top, mean=mean, stderr=stderr, n=self.n.copy(), ci_low=self.ci_low.copy(),
                              ci_high=self.ci_high.copy(), decided=self.decided.copy(),
                              decided_round=self.decided_round.copy(), in_top_k=members, rank=rank,
                              pairs=self.pairs, exhaustive_pairs=self.n_heads * self.n_images, rounds=self.round,
                              n_images=self.n_images)


def for_score(score: str, n_heads: int, n_images: int, k: int, *, big: np.ndarray | None = None,
              fig: np.ndarray | None = None, **options) -> AdaptiveTopK:
    """The adaptive scan of a run for K heads (the config's top_k as a count: `Config.k_of`) with the score's
    range (SCORE_RANGES) and, from D's BIG (and FIG) in D order, its per-image bounds (`term_bounds`).
    `options` go to AdaptiveTopK (delta, seed, first, growth, lead, ...)."""
    bounds = term_bounds(score, big, fig)
    low, high = SCORE_RANGES[score]
    return AdaptiveTopK(n_heads, n_images, k, low=low, high=high, bounds=bounds, **options)


# -- replay on a finished exhaustive scan --------------------------------------------------------
def exhaustive_top_k(matrix: np.ndarray, k: int) -> np.ndarray:
    """The exhaustive scan's top K of a (heads, images) matrix of terms: by mean, ties to the lower index."""
    return top(np.asarray(matrix, np.float64).mean(axis=1), k)


def replay(matrix: np.ndarray, k: int, *, low: float, high: float,
           bounds: tuple[np.ndarray, np.ndarray] | None = None, **options) -> AdaptiveResult:
    """Run the adaptive scan on a finished (heads, images) matrix of terms (D in its order) instead of a
    model; `options` go to AdaptiveTopK. result.extra["matched"]: whether its top-K set equals the exhaustive one."""
    matrix = np.asarray(matrix, np.float64)
    state = AdaptiveTopK(matrix.shape[0], matrix.shape[1], k, low=low, high=high, bounds=bounds, **options)
    spec = state.next_round()
    while spec is not None:
        spec = state.update([matrix[np.ix_(b.heads, b.images)] for b in spec.blocks])
    result = state.result()
    result.extra["matched"] = set(result.top_k.tolist()) == set(exhaustive_top_k(matrix, k).tolist())
    result.extra["heavy"] = state.heavy
    return result


def replay_resampled(matrix: np.ndarray, k: int, *, low: float, high: float,
                     bounds: tuple[np.ndarray, np.ndarray] | None = None, scales: tuple[int, ...] = (1, 4, 16),
                     resamples: int = 1, seed: int = 0, **options) -> list[dict]:
    """The saving as D grows: replays on bootstrap resamples of D's images (columns drawn with replacement, their
    bounds with them) at each scale x N, `resamples` of each. One dict per replay: scale, images, pairs,
    exhaustive_pairs, saving, matched, rounds, heavy."""
    matrix = np.asarray(matrix, np.float64)
    n = matrix.shape[1]
    rng = np.random.default_rng([seed, 0xB007])
    rows = []
    for scale in scales:
        for r in range(resamples):
            cols = rng.integers(0, n, size=scale * n)
            res = replay(matrix[:, cols], k, low=low, high=high, seed=seed + r,
                         bounds=None if bounds is None else (bounds[0][cols], bounds[1][cols]), **options)
            rows.append({"scale": scale, "resample": r, "images": scale * n, "pairs": res.pairs,
                         "exhaustive_pairs": res.exhaustive_pairs, "saving": res.saving,
                         "matched": res.extra["matched"], "rounds": res.rounds, "heavy": res.extra["heavy"]})
    return rows


# -- what to expect before a scan (`cigma-ray plan --adaptive`) ---------------------------------------------
# Savings (exhaustive pairs / pairs measured) the replays measured on the 320-head random-weight ViT of
# benchmarks/results/adaptive-wide-vit-10x32-*.json (K = 16, delta = 0.05, big_drop; D and its bootstrap
# resamples at 4x and 16x, mean of 3), by the images of D. The saving depends on how far the heads' scores sit
# below the K-th and on how BIG spreads over D, which no config file says; these curves are a planning figure,
# not a promise. (With --order screen the scan's own saving is the same; the screen's forwards come on top.)
REFERENCE_SAVINGS = {"none": ((2026, 2.73), (8104, 5.66), (32416, 12.38)),
                     "screen": ((2026, 2.73), (8104, 5.66), (32416, 12.45))}


def expected_saving(n_images: int, order: str = "none") -> float:
    """The saving to plan with at N images of D: the reference replays' savings interpolated in log N and log
    saving, extended past their ends along the end segments' slopes, and never below 1 (at a few hundred
    images nothing leaves early)."""
    points = REFERENCE_SAVINGS[order]
    x = np.log([p[0] for p in points])
    y = np.log([p[1] for p in points])
    t = math.log(max(1, n_images))
    if t <= x[0]:
        value = y[0] + (t - x[0]) * (y[1] - y[0]) / (x[1] - x[0])
    elif t >= x[-1]:
        value = y[-1] + (t - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2])
    else:
        value = float(np.interp(t, x, y))
    return max(1.0, math.exp(value))
