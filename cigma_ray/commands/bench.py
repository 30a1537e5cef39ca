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


def settings(args: argparse.Namespace) -> Settings:
    """Check every argument before any measurement, and fill in the device's defaults."""
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


def run(s: Settings) -> int:
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
