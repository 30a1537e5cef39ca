"""One model replica: the batched work of every stage on one device, tensors in and out."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from ..config import Config
from ..method import bir, counterfactuals, foreground_cells, gains, js, optimise_masks, probs, swapped
from ..models import LoadedModel
from ..models.base import HeadSums
from .checks import check_finite
from .memory import micro_batches, replica_estimate, scan_batch
from .scan import Ablated, batched, scan_heads
from .screen import Screened, screen_images

PRECISIONS = ("fp32", "bf16")
T = TypeVar("T")
log = logging.getLogger(__name__)


def halving_on_oom(run: Callable[[int], T], batch_size: int) -> tuple[T, int]:
    """run(batch_size), halving the batch size after each out-of-memory error; (result, size that fit).

    Safe for the forward passes and the scan, whose results do not depend on the batch size.
    """
    while True:
        try:
            return run(batch_size), batch_size
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            log.warning("out of memory: batch size lowered to %d", batch_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


@dataclass
class MaskResult:
    mask: torch.Tensor  # (N, s, s) fp32 soft mask M
    fg: torch.Tensor  # (N, s, s) bool, the kept cells S
    fig: torch.Tensor
    big: torch.Tensor
    bir: torch.Tensor


class Replica:
    """Holds a loaded model on a device and runs each stage's math on batches of images."""

    def __init__(self, loaded: LoadedModel, device: str = "cpu", precision: str = "fp32", batch_size: int = 64):
        if precision not in PRECISIONS:
            raise ValueError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        self.loaded = loaded
        self.adapter = loaded.adapter
        self.device = torch.device(device)
        self.precision = precision
        self.batch_size = batch_size
        self.name = loaded.fingerprint.get("name", "the model")
        self.estimate = self.device_bytes = None
        self.gpus = 1
        if self.device.type == "cuda":  # a large model's scan starts at a batch that fits (engine.memory)
            self.estimate = replica_estimate(self.adapter, precision)
            if self.estimate is not None:
                self.device_bytes = torch.cuda.get_device_properties(self.device).total_memory
                self.gpus = len({p.device for p in self.adapter.model.parameters() if p.device.type == "cuda"}) or 1
                self.batch_size = scan_batch(batch_size, self.estimate, self.device_bytes, self.gpus)
                if self.batch_size < batch_size:
                    log.info("batch size %d (of batch_size %d) fits %s beside its weights", self.batch_size, batch_size,
                             self.device)

    def upload(self, x: torch.Tensor) -> torch.Tensor:
        """To the device; from pinned host memory without blocking when it is a GPU."""
        if self.device.type == "cuda" and x.device.type == "cpu":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _logits(self, x: torch.Tensor, keep: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        with self.autocast():
            return check_finite(self.adapter.logits(x, keep).float(), self.name)

    @torch.inference_mode()
    def logits(self, images: torch.Tensor, keep: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (N, C) in fp32 on the CPU; `keep` masks are per layer (1, heads), broadcast to the batch."""
        def run(x: torch.Tensor) -> torch.Tensor:
            k = None if keep is None else {l: m.to(self.device).expand(len(x), -1) for l, m in keep.items()}
            return self._logits(self.upload(x), k)
        out, self.batch_size = halving_on_oom(lambda size: batched(run, images, size).cpu(), self.batch_size)
        return out

    def masks(self, images: torch.Tensor, cfg: Config, on_step: Callable[[], None] | None = None) -> MaskResult:
        """Learn the masks of these images together, binarise them, and measure FIG, BIG, BIR.

        The images are optimised as one batch whatever `batch_size` is: Adam's normalised steps
        amplify float rounding in near-zero gradients, so only a fixed batch composition (the
        run's mask unit) gives masks that are reproducible bit for bit. Each step's forward and
        backward may run in slices of the config's `mask_micro_batch` images, fixed per run too.
        `on_step` is called after each of the mask_steps optimisation steps.
        """
        x = self.upload(images)
        fits = self.mask_micro_batch_that_fits()
        if fits is not None and (cfg.mask_micro_batch or len(x)) > fits:
            log.warning("%d images per mask forward and backward may not fit on %s (estimate: %d); config key "
                        "mask_micro_batch: %d would", cfg.mask_micro_batch or len(x), self.device, fits, fits)
        try:
            with torch.no_grad():
                q = probs(batched(self._logits, x, cfg.mask_micro_batch or len(x)), cfg.tau)
            mask = optimise_masks(self._logits, x, q, mask_size=cfg.mask_size, mask_lr=cfg.mask_lr,
                                  mask_steps=cfg.mask_steps, l_js=cfg.l_js, l_1=cfg.l_1, l_tv=cfg.l_tv, tau=cfg.tau,
                                  micro_batch=cfg.mask_micro_batch, on_step=on_step, mask_tol=cfg.mask_tol,
                                  mask_window=cfg.mask_window).cpu()
        except torch.OutOfMemoryError as e:  # halving would change the masks (see above), so say what to do
            estimate = f"; by the estimate {fits} fit, which `cigma-ray plan` prints too" if fits is not None else ""
            raise torch.OutOfMemoryError(f"out of memory learning {len(x)} masks together on {self.device}; set the "
                                         f"config key mask_micro_batch (now {cfg.mask_micro_batch}) to fewer images "
                                         f"per forward and backward{estimate}, or lower mask_batch (now "
                                         f"{cfg.mask_batch}), and use a new --out: both change the masks") from e
        fg = foreground_cells(mask, cfg.keep_ratio)
        fig, big = self.gains(images, fg, cfg.tau)
        return MaskResult(mask=mask, fg=fg, fig=fig, big=big, bir=torch.from_numpy(bir(fig.numpy(), big.numpy())))

    def mask_micro_batch_that_fits(self) -> int | None:
        """Images per mask forward and backward that fit on this GPU by engine.memory's estimate (None off GPUs
        and for small models)."""
        if self.estimate is None:
            return None
        return micro_batches(self.estimate, self.device_bytes, self.gpus)["mask"]

    def gains(self, images: torch.Tensor, fg: torch.Tensor, tau: float,
              keep: dict[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(FIG, BIG) per image under the given keep-masks (intact model when None)."""
        no_bg, no_fg = counterfactuals(images, fg)
        q, q_no_fg, q_no_bg = (probs(self.logits(x, keep), tau) for x in (images, no_fg, no_bg))
        return gains(q, q_no_fg, q_no_bg)

    def swap_gains(self, images: torch.Tensor, fg: torch.Tensor, donor_images: torch.Tensor, tau: float,
                   keep: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """SWAP_i = JS(q(I_i), q(I_i,swap)) per image, I_swap = S_i * I_i + (1 - S_i) * I_donor (intact model when
        `keep` is None)."""
        q, q_swap = (probs(self.logits(x, keep), tau) for x in (images, swapped(images, fg, donor_images)))
        return js(q, q_swap)

    def scan(self, images: torch.Tensor, fg: torch.Tensor, heads: list[tuple[int, int]], tau: float,
             on_pairs: Callable[[int], None] | None = None, removed: list[tuple[int, int]] = (),
             measure_fig: bool = False, donor_images: torch.Tensor | None = None) -> Ablated:
        """BIG^(-h) (and FIG^(-h) with `measure_fig`, SWAP^(-h) given each image's donor image) per (head, image),
        with the `removed` heads ablated throughout."""
        no_bg, no_fg = counterfactuals(images, fg)
        x, x_no_bg = self.upload(images), self.upload(no_bg)
        x_no_fg = self.upload(no_fg) if measure_fig else None
        x_swap = self.upload(swapped(images, fg, donor_images)) if donor_images is not None else None
        fixed = {layer: k[0] for layer, k in self.keep_without(list(removed)).items()}
        out, self.batch_size = halving_on_oom(
            lambda size: scan_heads(self.adapter, x, x_no_bg, heads, tau=tau, batch_size=size, autocast=self.autocast,
                                    on_pairs=on_pairs, removed=fixed, images_no_fg=x_no_fg, images_swap=x_swap,
                                    model_name=self.name),
            self.batch_size)
        return out

    @torch.inference_mode()
    def head_output_sums(self, images: torch.Tensor) -> HeadSums:
        """The float64 sums of every head's output over these images and their tokens, on the intact model
        (mean ablation's substitutes are sums over D divided by counts), in batches of `batch_size`."""
        def run(size: int) -> HeadSums:
            total = None
            for i in range(0, len(images), size):
                with self.autocast():
                    part = self.adapter.head_output_sums(self.upload(images[i: i + size]))
                if total is None:
                    total = part
                else:
                    for layer in range(len(total.sums)):
                        total.sums[layer] += part.sums[layer]
                        total.counts[layer] += part.counts[layer]
            return total
        out, self.batch_size = halving_on_oom(run, self.batch_size)
        return out

    def screen(self, images: torch.Tensor, fg: torch.Tensor, tau: float, measure_fig: bool = True) -> Screened:
        """The gradient pre-screen of these images (engine.screen): dBIG_i/dg_h (and dFIG_i/dg_h) for every head."""
        x = self.upload(images)
        out, self.batch_size = halving_on_oom(
            lambda size: screen_images(self.adapter, x, fg.to(self.device), tau=tau, measure_fig=measure_fig,
                                       batch_size=size, autocast=self.autocast), self.batch_size)
        return out

    def keep_without(self, heads: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
        """Per-layer (1, heads) keep-masks that ablate the given heads together."""
        keep = {layer: torch.ones(1, n) for layer, n in enumerate(self.adapter.heads_per_layer)}
        for layer, head in heads:
            keep[layer][0, head] = 0
        return {layer: k for layer, k in keep.items() if not bool(k.all())}
