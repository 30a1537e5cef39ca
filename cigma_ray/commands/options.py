"""Options shared by several commands, in one place: the model options (scan, cluster render), the scan's
own (scan, cluster render), the eval options (prune, sweep), the device and the run directory.

Each group is a typed settings object built from the parsed arguments; `to_argv` writes it back as
the command line that gives it, so `cluster render` builds its entrypoint from the same object.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass

import yaml

from ..config import ConfigError
from ..method import SCORES
from ..models import ModelError, ModelSpec

HEADS = ("vision", "vision+text")
SCORINGS = ("sequence", "first")
MASK_IMAGES = 64  # default images per eval set whose masks are learned for BIR
AUTO_K_MASK_IMAGES = 256  # prune --auto-k: held-out images masked for BIR and conflict accuracy (tighter intervals)
RANDOM_SEEDS = 5


def parse_kwargs(items: list[str] | tuple[str, ...]) -> dict:
    """timm-style `key=value` pairs; values are parsed as YAML scalars (8 -> int, avg -> str)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--model-kwargs {item!r}: write key=value, e.g. --model-kwargs global_pool=avg depth=6")
        out[key] = yaml.safe_load(value)
    return out


def read_classes(path: str | None) -> tuple[str, ...]:
    """Class names from a file, one per line (blank lines skipped); the names, not the path, go into the spec."""
    if path is None:
        return ()
    try:
        with open(path) as f:
            names = tuple(line.strip() for line in f if line.strip())
    except OSError as e:
        raise ConfigError(f"--classes {path}: {e.strerror}") from None
    if not names:
        raise ConfigError(f"--classes {path}: no class names in it (one per line)")
    return names


def check_device_name(device: str | None) -> str | None:
    """--device is cpu or cuda[:N] (checked by its spelling alone: a Ray driver need not have the GPUs)."""
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ConfigError(f"--device {device!r}: use cpu or cuda[:N] (e.g. --device cuda:0)")
    return device


def check_device(device: str) -> str:
    """--device spelled right, and CUDA there when it names CUDA (for work in this process)."""
    import torch

    check_device_name(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here; use --device cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def check_count(value: int | None, flag: str, least: int = 1, what: str = "") -> None:
    """An integer option that must be at least `least` (None: not given)."""
    if value is not None and value < least:
        raise ConfigError(f"{flag} {value}: {what or 'give a count'} of at least {least}")


def check_checkpoint(path: str | None) -> None:
    """--checkpoint names a readable file (before anything is loaded)."""
    if path is None:
        return
    if os.path.isdir(path):
        raise ModelError(f"--checkpoint {path}: is a directory; give the weights file (.pth, .pt or .safetensors)")
    if not os.path.isfile(path):
        raise ModelError(f"--checkpoint {path}: file not found")


# -- the model ------------------------------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--model", required=True, help="timm:NAME (e.g. timm:vit_base_patch16_224), or hf:DIR for a "
                   "transformers CLIP, LLaVA, LLaVA-NeXT or InternVL directory (or an s3://... copy of one)")
    p.add_argument("--checkpoint", help="weights file (PyTorch or safetensors state dict)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: from the checkpoint, else timm's)")
    p.add_argument("--img-size", type=int, help="input size passed to timm.create_model")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="more timm.create_model arguments")
    p.add_argument("--random-weights", action="store_true", help="scan a randomly initialised model (tests, benchmarks)")
    p.add_argument("--classes", metavar="FILE", help="hf: class names, one per line in label order (default: the "
                   "data's class folder names)")
    p.add_argument("--prompt", action="append", default=[], help="hf: a CLIP prompt template with {} (repeat for "
                   "an ensemble; default 'a photo of a {}.'), or a VLM's question with {classes}")
    p.add_argument("--heads", default="vision", choices=HEADS, help="hf: the heads to scan "
                   "(a VLM's vision encoder, or also its language model; default vision)")
    p.add_argument("--scoring", default="sequence", choices=SCORINGS, help="hf VLM: a class's logit is "
                   "the summed log-probability of its answer tokens, or of its first token only (default sequence)")


@dataclass(frozen=True)
class ModelOptions:
    """--model and the options that say how to build it."""

    model: str
    checkpoint: str | None = None
    num_classes: int | None = None
    img_size: int | None = None
    model_kwargs: tuple[str, ...] = ()
    random_weights: bool = False
    classes: str | None = None  # a file of class names
    prompts: tuple[str, ...] = ()
    heads: str = "vision"
    scoring: str = "sequence"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ModelOptions":
        options = cls(model=args.model, checkpoint=args.checkpoint, num_classes=args.num_classes,
                      img_size=args.img_size, model_kwargs=tuple(args.model_kwargs or ()),
                      random_weights=args.random_weights, classes=args.classes, prompts=tuple(args.prompt),
                      heads=args.heads, scoring=args.scoring)
        check_count(options.num_classes, "--num-classes", what="the classifier's outputs, a count")
        check_count(options.img_size, "--img-size", what="the input size in pixels, a size")
        parse_kwargs(options.model_kwargs)
        return options

    def spec(self, seed: int) -> ModelSpec:
        """The ModelSpec these options build (the --classes file is read here)."""
        return ModelSpec(name=self.model, checkpoint=self.checkpoint, num_classes=self.num_classes,
                         img_size=self.img_size, model_kwargs=parse_kwargs(self.model_kwargs),
                         random_weights=self.random_weights, seed=seed, heads=self.heads,
                         classes=read_classes(self.classes), prompts=self.prompts, scoring=self.scoring)

    def to_argv(self, classes_path: str | None = None) -> list[str]:
        """The command-line options that give these options (the classes file named `classes_path`)."""
        out = ["--model", self.model]
        if self.checkpoint:
            out += ["--checkpoint", self.checkpoint]
        if self.num_classes is not None:
            out += ["--num-classes", str(self.num_classes)]
        if self.img_size is not None:
            out += ["--img-size", str(self.img_size)]
        if self.model_kwargs:
            out += ["--model-kwargs", *self.model_kwargs]
        if self.random_weights:
            out.append("--random-weights")
        if self.classes:
            out += ["--classes", classes_path or self.classes]
        for prompt in self.prompts:
            out += ["--prompt", prompt]
        if self.heads != "vision":
            out += ["--heads", self.heads]
        if self.scoring != "sequence":
            out += ["--scoring", self.scoring]
        return out


# -- a scan ---------------------------------------------------------------------------------------

def add_scan_args(p: argparse.ArgumentParser | argparse._ArgumentGroup, *, for_render: bool = False) -> None:
    """The model, data, run directory, config and precision of a scan (`scan`, and `cluster render`)."""
    add_model_args(p)
    if for_render:
        p.add_argument("--data", required=True, help="ImageFolder or Parquet, as the pods see it (e.g. s3://...)")
        p.add_argument("--out", required=True, help="run directory, as the pods see it (e.g. s3://bucket/runs/x)")
        p.add_argument("--config", help="YAML file of config keys; its content goes into a ConfigMap")
        p.add_argument("--device", help="passed to the scan (replicas with GPUs use CUDA anyway)")
        p.add_argument("--precision", choices=["fp32", "bf16"], help="passed to the scan (default: bf16 for an hf: "
                       "model on GPUs, else fp32)")
        p.add_argument("--quiet", action="store_true", help="passed to the scan: no progress bars in the logs")
        return
    p.add_argument("--data", required=True, help="ImageFolder directory or Parquet table")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--config", help="YAML file of config keys (see README)")
    p.add_argument("--device", help="cpu or cuda[:N] (default cpu; on Ray, cuda for replicas that hold GPUs)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 for an hf: model whose replicas run "
                   "on GPUs (its weights load in bf16: half the memory; see README), fp32 otherwise (the exact path)")


@dataclass(frozen=True)
class ScanOptions:
    """What defines a scan as a command line: the model, data, run directory, config file, device,
    precision and --quiet (not where it runs: that is the scan command's own --address etc.)."""

    model: ModelOptions
    data: str
    out: str
    config: str | None = None
    device: str | None = None
    precision: str | None = None
    quiet: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ScanOptions":
        """The scan's options, checked by what they say (no model, data or storage is touched): `--out` apart
        from `--data`, a device spelled right."""
        from ..rundir import check_out

        check_out(args.out, [args.data], existing_file=False)  # (render: the pods' paths, not this machine's)
        return cls(model=ModelOptions.from_args(args), data=args.data, out=args.out, config=args.config,
                   device=check_device_name(args.device), precision=args.precision, quiet=args.quiet)

    def to_argv(self, config_path: str | None = None, classes_path: str | None = None) -> list[str]:
        """`cigma-ray scan`'s options for this scan, with the config and classes files at the given paths."""
        out = [*self.model.to_argv(classes_path), "--data", self.data, "--out", self.out]
        if self.config:
            out += ["--config", config_path or self.config]
        if self.device:
            out += ["--device", self.device]
        if self.precision:
            out += ["--precision", self.precision]
        if self.quiet:
            out.append("--quiet")
        return out


# -- runs and their evaluation --------------------------------------------------------------------

def add_run_arg(p: argparse.ArgumentParser, what: str = "run directory") -> None:
    p.add_argument("run", help=what)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """The options of `prune` and `sweep`: eval data, masks, controls, scores, device, checkpoint."""
    p.add_argument("--eval-data", action="append", metavar="PATH", help="ImageFolder directory or Parquet table "
                   "to evaluate on, as --data of scan; repeat for several (default: the scan's own data; with "
                   "--auto-k, once, default: the scan's correctly classified images outside D)")
    p.add_argument("--mask-images", type=int, metavar="N", help="images per eval set whose masks are learned for BIR "
                   f"and counterfactual conflict accuracy (default {MASK_IMAGES}, with --auto-k {AUTO_K_MASK_IMAGES}; "
                   "the scan's own data uses the run's masks of D)")
    p.add_argument("--random-seeds", type=int, default=RANDOM_SEEDS, metavar="N", help="draws of K random heads "
                   f"(default {RANDOM_SEEDS})")
    p.add_argument("--scores", metavar="S1,S2", help="which of the run's scores rank the heads, comma-separated: "
                   f"{', '.join(SCORES)} (default: every score the run has)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--checkpoint", metavar="FILE", help="the scanned weights, when the file has moved since the scan")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@dataclass(frozen=True)
class EvalOptions:
    """The eval options of prune and sweep, checked before any model or image is loaded."""

    run: str
    eval_data: tuple[str, ...] = ()
    mask_images: int = MASK_IMAGES
    random_seeds: int = RANDOM_SEEDS
    scores: str | None = None
    device: str = "cpu"
    checkpoint: str | None = None
    quiet: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, mask_images: int | None = None) -> "EvalOptions":
        """The options as given; `mask_images` is the command's default for --mask-images (else MASK_IMAGES)."""
        masked = args.mask_images if args.mask_images is not None else (mask_images or MASK_IMAGES)
        if masked < 1 or args.random_seeds < 1:
            raise ConfigError("--mask-images and --random-seeds must be at least 1")
        check_device_name(args.device)
        check_checkpoint(args.checkpoint)
        from ..rundir import check_out

        for url in args.eval_data or ():  # eval/ files among the images would make them a Parquet table
            check_out(args.run, [url], data_label="--eval-data", out_label="the run directory")
        return cls(run=args.run, eval_data=tuple(args.eval_data or ()), mask_images=masked,
                   random_seeds=args.random_seeds, scores=args.scores, device=args.device,
                   checkpoint=args.checkpoint, quiet=args.quiet)

    def reopen(self, ranked) -> tuple:
        """(scanned run, scores, seeds): the --scores asked for, every --eval-data source checked before the model
        loads, then the ranked run reopened with its model on --device, and the random draws' seeds."""
        from ..evaluation import open_eval_source

        scores = ranked.parse_scores(self.scores)
        for url in self.eval_data:
            open_eval_source(ranked, url)
        scanned = ranked.reopen(check_device(self.device), self.checkpoint)
        return scanned, scores, [scanned.cfg.seed + i for i in range(self.random_seeds)]


def parse_ks(text: str) -> list[int]:
    """--k 0,4,8: sorted distinct K values."""
    try:
        ks = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise ConfigError(f"--k {text!r}: write K values separated by commas, e.g. --k 0,4,8,16") from None
    return ks
