"""`cigma-ray plan --model hf:DIR`: memory per stage, micro-batches, placement, host memory, forwards and time of
a scan, from config.json alone (read without running the model's code; never prompts)."""
from __future__ import annotations

import argparse

from .. import config as config_mod
from ..config import ConfigError
from ..engine.memory import BYTES
from ..plan import GPUS, PlanSettings
from .options import HEADS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="hf:DIR or a config.json path (no weights needed)")
    p.add_argument("--precision", default="bf16", choices=sorted(BYTES))
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="GPU type (default h100)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--images", type=int, default=10_000, help="images in the data set (default 10000)")
    p.add_argument("--accuracy", type=float, default=1.0, help="expected share classified correctly (default 1.0)")
    p.add_argument("--config", help="the scan's YAML config file: tp_ratio, mask_steps, measure_fig, measure_swap, "
                   "mask_batch, mask_micro_batch, batch_size and the adaptive keys come from it")
    p.add_argument("--tp-ratio", type=float, help="config key tp_ratio (default: the config's, 0.4)")
    p.add_argument("--mask-steps", type=int, help="config key mask_steps (default: the config's, 250)")
    p.add_argument("--heads", default="vision", choices=HEADS)
    p.add_argument("--classes", type=int, default=10, help="number of classes (prompt and scoring length; default 10)")
    p.add_argument("--rate", type=float, help="measured whole-model forwards per second per replica")
    p.add_argument("--adaptive", action="store_true", help="the scan's forwards with `scan --adaptive` (an estimate: "
                   "the exhaustive count over the saving replays measured at this many images of D; see --saving)")
    p.add_argument("--saving", type=float, help="with --adaptive: the saving to plan with, as `cigma-ray bench "
                   "adaptive RUN` measured it on a comparable run (instead of the built-in reference)")


def settings(args: argparse.Namespace) -> PlanSettings:
    cfg = config_mod.load(args.config)
    if args.saving is not None and not (args.adaptive or cfg.adaptive):
        raise ConfigError("--saving is the adaptive scan's: add --adaptive")
    if args.saving is not None and not args.saving >= 1:
        raise ConfigError(f"--saving {args.saving}: exhaustive forwards over adaptive ones, a number >= 1 (e.g. 2.6)")
    return PlanSettings(model=args.model, precision=args.precision, gpu=args.gpu, gpus_per_node=args.gpus_per_node,
                        nodes=args.nodes, images=args.images, accuracy=args.accuracy,
                        tp_ratio=cfg.tp_ratio if args.tp_ratio is None else args.tp_ratio,
                        mask_steps=cfg.mask_steps if args.mask_steps is None else args.mask_steps, heads=args.heads,
                        classes=args.classes, rate=args.rate, measure_fig=cfg.measure_fig,
                        measure_swap=cfg.measure_swap, mask_batch=cfg.mask_batch,
                        mask_micro_batch=cfg.mask_micro_batch, batch_size=cfg.batch_size,
                        adaptive=args.adaptive or cfg.adaptive, adaptive_order=cfg.adaptive_order,
                        adaptive_saving=args.saving)


def run(s: PlanSettings) -> int:
    from ..models.hf.sizes import read_config
    from ..reports.plan import plan_text

    config = read_config(s.model)
    try:
        plan = s.plan(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(plan_text(s.model, plan, s))
    return 0
