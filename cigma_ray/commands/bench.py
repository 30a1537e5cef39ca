"""`cigma-ray bench`: forward rate, paper-style loop, engine scan and mask stage, measured together;
the table on stdout, JSON and a PNG plot in --results."""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import torch

from ..bench.suite import DEFAULTS, Settings
from ..config import ConfigError
from ..models import ModelError
from .options import check_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mode", nargs="?", choices=["adaptive"], help="adaptive RUN: replay the adaptive scan on a "
                   "finished exhaustive run's deltas (no model): forwards used against the exhaustive scan, whether "
                   "the top-K set matched, and the saving on bootstrap resamples of D at 1x, 4x and 16x its size "
                   "(without a mode: the scan measurements below)")
    p.add_argument("run", nargs="?", help="adaptive: a finished exhaustive run directory")
    adaptive = p.add_argument_group("bench adaptive RUN")
    adaptive.add_argument("--delta", type=float, help="the adaptive scan's error probability (default: 0.05)")
    adaptive.add_argument("--top-k", type=_count_or_fraction, help="K: a count, or a fraction of the heads (default: "
                          "the run's top_k)")
    adaptive.add_argument("--scales", help="resample D at these multiples of its size (default 1,4,16)")
    adaptive.add_argument("--resamples", type=int, help="replays per scale (default 1)")
    adaptive.add_argument("--order", choices=["none", "screen"], help="screen: lead with the run's pre-screen "
                          "(screen.parquet, from `cigma-ray screen RUN`), as `scan --adaptive --order screen` does")
    adaptive.add_argument("--json", metavar="FILE", help="also write the numbers as JSON here")
    p.add_argument("--model", nargs="+", metavar="NAME", help="timm model names (timm: prefix optional)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="default fp32 on cpu, bf16 on cuda")
    p.add_argument("--images", type=int, help="images per scan (default 6 on cpu, 64 on cuda)")
    p.add_argument("--batch-sizes", metavar="B1,B2,...", help="batch sizes of the forward and engine sweeps "
                   "(default 1,8,32 on cpu; 32,64,128,256,512 on cuda)")
    p.add_argument("--mask-steps", type=int, help="mask steps timed (default 5 on cpu, 10 on cuda)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up, each measurement once "
                   "per round in turn; each keeps its best (default 3)")
    p.add_argument("--img-size", type=int, help="input size passed to timm.create_model")
    p.add_argument("--results", default="benchmarks/results", help="folder for the JSON and PNG, relative to "
                   "the current directory (default benchmarks/results)")
    p.add_argument("--no-bf16-check", action="store_true", help="skip the bf16 vs fp32 top-k comparison")


def positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{flag} {value}: must be a positive integer")


def parse_batch_sizes(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]; anything but positive integers is an error that says so."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--batch-sizes {text!r}: write positive integers separated by commas, e.g. 1,8,32")
    return sorted(set(sizes))


def model_name(name: str) -> str:
    """The timm architecture, with or without the `timm:` prefix the other commands use."""
    import timm

    arch = name.removeprefix("timm:")
    if ":" in arch or not timm.is_model(arch):
        raise ModelError(f"--model {name!r}: timm has no model {arch!r} (e.g. vit_tiny_patch16_224)")
    return arch


ADAPTIVE_ONLY = ("delta", "top_k", "scales", "resamples", "order", "json")
SCAN_ONLY = ("model", "device", "precision", "images", "batch_sizes", "mask_steps", "img_size", "no_bf16_check")


def _count_or_fraction(text: str) -> int | float:
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a count of heads (16) or a fraction of them (0.02)") from None


def adaptive_settings(args: argparse.Namespace):
    """`bench adaptive RUN`'s options, checked."""
    from ..bench.adaptive import AdaptiveBench

    if not args.run:
        raise ConfigError("bench adaptive needs a RUN: a finished exhaustive run directory")
    scan_options = [f"--{k.replace('_', '-')}" for k in SCAN_ONLY if getattr(args, k) not in (None, False)]
    if scan_options:
        raise ConfigError(f"{', '.join(scan_options)}: options of the scan measurements, not of bench adaptive")
    delta = 0.05 if args.delta is None else args.delta
    if not 0 < delta < 1:
        raise ConfigError(f"--delta {delta}: an error probability in (0, 1), e.g. 0.05")
    if args.top_k is not None and (args.top_k <= 0 or (isinstance(args.top_k, float) and args.top_k >= 1)):
        raise ConfigError(f"--top-k {args.top_k}: a count of heads >= 1 or a fraction of them in (0, 1)")
    try:
        scales = tuple(int(x) for x in (args.scales or "1,4,16").split(","))
    except ValueError:
        scales = ()
    if not scales or min(scales) < 1:
        raise ConfigError(f"--scales {args.scales!r}: positive integers separated by commas, e.g. 1,4,16")
    positive(args.resamples, "--resamples")
    return AdaptiveBench(run=args.run, delta=delta, top_k=args.top_k, scales=scales, resamples=args.resamples or 1,
                         order=args.order or "none", json=args.json)


def settings(args: argparse.Namespace):
    """Check every argument before any measurement, and fill in the device's defaults."""
    if args.mode == "adaptive":
        return adaptive_settings(args)
    if args.run:
        raise ConfigError(f"{args.run!r}: bench takes a RUN only in a mode (bench adaptive RUN)")
    adaptive_options = [f"--{k.replace('_', '-')}" for k in ADAPTIVE_ONLY if getattr(args, k) is not None]
    if adaptive_options:
        raise ConfigError(f"{', '.join(adaptive_options)}: options of `bench adaptive RUN`")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ConfigError(f"--device {device!r}: use cpu or cuda[:N]")
    check_device(device)
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("the plot needs matplotlib: pip install 'cigma-ray[bench]'")
    for value, flag in ((args.images, "--images"), (args.mask_steps, "--mask-steps"), (args.repeats, "--repeats"),
                        (args.img_size, "--img-size")):
        positive(value, flag)
    defaults = DEFAULTS[torch.device(device).type]
    return Settings(
        models=[model_name(m) for m in args.model or defaults["models"]],
        device=device,
        precision=args.precision or defaults["precision"],
        images=args.images or defaults["images"],
        batch_sizes=parse_batch_sizes(args.batch_sizes) if args.batch_sizes else defaults["batch_sizes"],
        mask_steps=args.mask_steps or defaults["mask_steps"],
        repeats=args.repeats,
        img_size=args.img_size,
        bf16_check=not args.no_bf16_check,
        results=args.results,
    )


def run(s) -> int:
    if not isinstance(s, Settings):
        return run_adaptive(s)
    from ..bench import file_stem, run_suite
    from ..reports.bench import bench_figure, bench_text

    result = run_suite(s)
    print(bench_text(result))
    folder = Path(s.results)
    folder.mkdir(parents=True, exist_ok=True)
    stem = file_stem(result)
    json_path, png_path = folder / f"{stem}.json", folder / f"{stem}.png"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    bench_figure(result, png_path)
    print(f"saved {json_path} and {png_path}")
    return 0


def run_adaptive(s) -> int:
    from ..bench.adaptive import replay_bench
    from ..reports.bench import adaptive_bench_text

    result = replay_bench(s)
    print(adaptive_bench_text(result))
    if s.json:
        Path(s.json).parent.mkdir(parents=True, exist_ok=True)
        Path(s.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"saved {s.json}")
    return 0
