"""`cigma-ray export RUN --out FILE`: the pruned model as timm weights (and optionally a smaller model)."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from ..config import ConfigError
from .options import add_run_arg, check_checkpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arg(p, "run directory with a rankings.parquet")
    p.add_argument("--out", required=True, metavar="FILE", help="state dict to write (.pth, .pt, or .safetensors): "
                   "of the timm model, or of an hf: run's transformers model class")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--k", type=int, help="remove the run's top K heads (default: the run's top_k)")
    which.add_argument("--heads", metavar="L.H,...", help="remove these heads instead, e.g. 3.1,5.0")
    p.add_argument("--score", help="with --k: rank by this score of the run (big_drop, bir_drop, big_minus_fig, "
                   "swap_drop; default: the run's score key)")
    p.add_argument("--smaller", metavar="FILE", help="also write the model with those heads physically removed")
    p.add_argument("--checkpoint", metavar="FILE", help="the weights the run scanned, if the file has moved since "
                   "(checked against the run's sha256)")


@dataclass(frozen=True)
class Settings:
    run: str
    out: str
    k: int | None = None
    heads: str | None = None
    score: str | None = None
    smaller: str | None = None
    checkpoint: str | None = None


def settings(args: argparse.Namespace) -> Settings:
    for path, flag in ((args.out, "--out"), (args.smaller, "--smaller")):
        if path is not None and (os.path.isdir(path) or path.endswith(("/", os.sep))):
            raise ConfigError(f"{flag} {path}: is a directory; give the file to write, e.g. "
                              f"{os.path.join(path, 'pruned.pth' if flag == '--out' else 'pruned-small.pt')}")
    if args.smaller is not None and os.path.abspath(args.smaller) == os.path.abspath(args.out):
        raise ConfigError(f"--smaller {args.smaller} is the --out file; give it another name")
    check_checkpoint(args.checkpoint)
    return Settings(args.run, args.out, args.k, args.heads, args.score, args.smaller, args.checkpoint)


def run(s: Settings) -> int:
    from ..export import CHECK_INPUTS, export_run

    info = export_run(s.run, s.out, k=s.k, heads=s.heads, smaller=s.smaller, checkpoint=s.checkpoint, score=s.score)
    named = " ".join(f"{r['layer']}.{r['head']}" for r in info["removed_heads"])
    print(f"removed {len(info['removed_heads'])} heads ({info['selection']}): {named}")
    kind = f"transformers {info['model']}" if "model_dir" in info else f"timm {info['model']}"
    how = ("the heads' weights zeroed, their mean outputs folded into the output projections' biases"
           if info.get("ablation") == "mean" else "the heads' weights zeroed")
    print(f"wrote {info['file']} ({kind}, {how}; {info['parameters']:,} parameters) "
          f"and {info['file']}.json (how to load it)")
    print(f"  equals the scan's keep-mask ablation: max |logit difference| "
          f"{info['check']['max_abs_logit_diff_vs_keep_mask']:.1e} on {CHECK_INPUTS} random inputs")
    small = info["smaller"]
    if small:
        print(f"wrote {small['file']} (heads per layer {' '.join(map(str, small['heads_per_layer']))}; "
              f"{small['parameters']:,} parameters, {small['parameters'] / info['parameters'] - 1:+.1%}); "
              "load with cigma_ray.models.surgery.load_smaller")
        print(f"  equals {info['file']}: max |logit difference| {small['max_abs_logit_diff_vs_zeroed']:.1e}")
    return 0
