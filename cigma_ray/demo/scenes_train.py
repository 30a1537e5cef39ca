"""Train the scenes model: pretrain a small ViT on another generated task, then fine-tune it on the biased split.

    python -m cigma_ray.demo.scenes_train [--out DIR] [--seed S] [--data-dir DIR] [--finetune full|linear]
                                     [--save-backbone FILE | --backbone FILE] [--threads N]

1. Pretraining (the features): `PRETRAIN_IMAGES` images of the pretraining task in data/scenes.py,
   24 object classes from random part blueprints (none is a benchmark class) on 8 background
   families (the benchmark's 4 and 4 others), both labels balanced and independent. The image
   head has 24 + 8 logits (object and background cross-entropies, summed); a dense head on the
   patch tokens, dropped afterwards, says for each patch which object or which background it
   shows. So the features learn objects and scenes, with no correlation between them.
2. Fine-tuning: a new 4-class head on the benchmark's `train` split (90% of backgrounds match
   the class), then every weight trained (`--finetune full`, the default: the shipped model), or
   only the head on the frozen features (`--finetune linear`: a linear probe, which on these
   features reads the background alone: aligned 0.995, conflicting 0.068).

Writes DIR/scenes_vit.pth (a plain fp32 state_dict of the 4-class model) and DIR/scenes_vit.json
(its card: recipe, times, machine, accuracy on every split and on the reduced splits). Load it
with `timm.create_model(SCENES_MODEL_NAME, **SCENES_MODEL_KWARGS)` and `load_state_dict`; the
tool needs `SCENES_LOAD_KWARGS` (crop_pct 1.0, so it sees the 64 px images uncropped).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.scenes import (
    BACKGROUNDS,
    CLASSES,
    GENERATOR_VERSION,
    P_ALIGNED,
    PRETRAIN_OBJECTS,
    SPLITS,
    ensure_scenes_data,
    pretrain_arrays,
)

SCENES_MODEL_NAME = "vit_tiny_patch16_224"
SCENES_MODEL_KWARGS = dict(img_size=64, patch_size=8, embed_dim=96, depth=6, num_heads=4, num_classes=len(CLASSES))
# What the tool needs to see the images exactly as trained: timm's eval transform would otherwise
# resize to 71 px and centre-crop 64, cutting objects that touch the border.
SCENES_LOAD_KWARGS = {**SCENES_MODEL_KWARGS, "pretrained_cfg_overlay": {"crop_pct": 1.0}}
MEAN = STD = 0.5  # timm's ViT defaults, on every channel

PRETRAIN_IMAGES = 16000
PRETRAIN_EPOCHS = 6
PRETRAIN_LR = 5e-4
FINETUNE_EPOCHS = {"linear": 60, "full": 8}
FINETUNE_LR = {"linear": 3e-3, "full": 5e-4}
BATCH_SIZE = 64
WEIGHT_DECAY = 0.05


def to_input(u8: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W uint8 -> the normalised float input the model was trained on."""
    return (u8.float() / 255.0 - MEAN) / STD


def load_split(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """An ImageFolder split as N x 3 x H x W uint8 and labels (classes in CLASSES order)."""
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((folder / name).glob("*.png")):
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(label)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(to_input(batch)).argmax(1) for batch in images.split(256)])


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict(model, images) == labels).float().mean())


def _schedule(opt: torch.optim.Optimizer, steps_per_epoch: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """One epoch of linear warm-up, then cosine decay to zero."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / steps_per_epoch) * 0.5 * (1 + np.cos(np.pi * s / total)))


def fit(model: torch.nn.Module, params, images: torch.Tensor, targets: torch.Tensor, loss_fn, epochs: int,
        lr: float, seed: int, name: str) -> None:
    """AdamW, warm-up + cosine, random horizontal flips; `targets` rows are passed to loss_fn with the logits."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(images) // BATCH_SIZE)
    sched = _schedule(opt, steps_per_epoch, epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        start, total, count = time.perf_counter(), 0.0, 0
        for idx in torch.randperm(len(images), generator=gen).split(BATCH_SIZE):
            x = to_input(images[idx])
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = loss_fn(model(x), targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
        print(f"{name} epoch {epoch + 1}/{epochs}: loss {total / count:.3f} ({time.perf_counter() - start:.0f} s)",
              flush=True)


def patch_targets(cover: torch.Tensor, objs: torch.Tensor, bgs: torch.Tensor, patch: int) -> torch.Tensor:
    """Per-patch pretraining labels (N x rows x cols): the object's class where it covers over a quarter of
    the patch, else PRETRAIN_OBJECTS + the background family."""
    n, h, w = cover.shape
    frac = cover.float().view(n, h // patch, patch, w // patch, patch).mean((2, 4)) / 255.0
    return torch.where(frac > 0.25, objs[:, None, None], PRETRAIN_OBJECTS + bgs[:, None, None])


class PretrainNet(torch.nn.Module):
    """The ViT with its image head (object + background logits) and a dense head on the patch tokens, used
    only while pretraining: every patch says whether it shows the object (and which) or the background (and
    which family), which teaches the features where objects are far faster than the image labels alone."""

    def __init__(self, vit: torch.nn.Module):
        super().__init__()
        self.vit = vit
        self.dense = torch.nn.Linear(vit.embed_dim, PRETRAIN_OBJECTS + len(BACKGROUNDS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.vit.forward_features(x)
        return self.vit.forward_head(tokens), self.dense(tokens[:, self.vit.num_prefix_tokens:])


def pretrain(seed: int, n_images: int = PRETRAIN_IMAGES, epochs: int = PRETRAIN_EPOCHS, lr: float = PRETRAIN_LR,
             held_out: int = 2000) -> tuple[torch.nn.Module, dict]:
    """The backbone: a ViT trained on the pretraining task; returns it (with its 32-logit head) and its stats."""
    start = time.perf_counter()
    images, objs, bgs, cover = pretrain_arrays(n_images + held_out, seed=seed)
    gen_seconds = time.perf_counter() - start
    print(f"pretraining data: {len(images)} images in {gen_seconds:.0f} s", flush=True)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    objs, bgs = torch.from_numpy(objs).long(), torch.from_numpy(bgs).long()
    torch.manual_seed(seed)
    kwargs = {**SCENES_MODEL_KWARGS, "num_classes": PRETRAIN_OBJECTS + len(BACKGROUNDS)}
    vit = timm.create_model(SCENES_MODEL_NAME, pretrained=False, **kwargs)
    dense_targets = patch_targets(torch.from_numpy(cover), objs, bgs, vit.patch_embed.patch_size[0])
    net = PretrainNet(vit)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-n_images // BATCH_SIZE)
    sched = _schedule(opt, steps_per_epoch, epochs * steps_per_epoch)
    held = torch.arange(n_images, n_images + held_out)

    def evaluate() -> dict:
        net.eval()
        with torch.no_grad():
            outs = [net(to_input(images[b])) for b in held.split(256)]
        logits = torch.cat([o[0] for o in outs])
        dense = torch.cat([o[1] for o in outs]).argmax(-1)
        target = dense_targets[held].flatten(1)
        on_object = target < PRETRAIN_OBJECTS
        return {"object": float((logits[:, :PRETRAIN_OBJECTS].argmax(1) == objs[held]).float().mean()),
                "background": float((logits[:, PRETRAIN_OBJECTS:].argmax(1) == bgs[held]).float().mean()),
                "object_patches": float((dense == target)[on_object].float().mean()),
                "background_patches": float((dense == target)[~on_object].float().mean())}

    start = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        t0, total, count = time.perf_counter(), 0.0, 0
        for idx in torch.randperm(n_images, generator=gen).split(BATCH_SIZE):
            x, dense_y = to_input(images[idx]), dense_targets[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            dense_y = torch.where(flip[:, None, None], dense_y.flip(-1), dense_y)
            logits, dense = net(x)
            loss = (F.cross_entropy(logits[:, :PRETRAIN_OBJECTS], objs[idx])
                    + F.cross_entropy(logits[:, PRETRAIN_OBJECTS:], bgs[idx])
                    + F.cross_entropy(dense.flatten(0, 1), dense_y.flatten()))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
        acc = evaluate()
        print(f"pretrain epoch {epoch + 1}/{epochs}: loss {total / count:.3f}, held-out accuracy "
              + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    stats = {"images": n_images, "epochs": epochs, "lr": lr, "generate_seconds": round(gen_seconds, 1),
             "train_seconds": round(seconds, 1), "heldout_images": held_out,
             **{f"heldout_{k}_accuracy": v for k, v in acc.items()}}
    print("pretraining:", json.dumps(stats), flush=True)
    return vit, stats


@torch.no_grad()
def features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model.forward_head(model.forward_features(to_input(b)), pre_logits=True)
                      for b in images.split(256)])


def linear_probe(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float,
                 seed: int) -> None:
    """Train model.head alone on the frozen features of the images and of their mirror images."""
    feats = torch.cat([features(model, images), features(model, images.flip(-1))])
    ys = torch.cat([labels, labels])
    gen = torch.Generator().manual_seed(seed)
    head = model.get_classifier()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(feats) // 256)
    sched = _schedule(opt, steps_per_epoch, epochs * steps_per_epoch)
    for epoch in range(epochs):
        total = 0.0
        for idx in torch.randperm(len(feats), generator=gen).split(256):
            loss = F.cross_entropy(head(feats[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            print(f"linear probe epoch {epoch + 1}/{epochs}: loss {total / len(feats):.3f}", flush=True)


def finetune(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, mode: str, seed: int,
             epochs: int | None = None) -> float:
    """Replace the head with a new 4-class one (seeded) and train it (mode linear) or everything (full)."""
    torch.manual_seed(seed + 1)
    model.reset_classifier(len(CLASSES))
    epochs = FINETUNE_EPOCHS[mode] if epochs is None else epochs
    start = time.perf_counter()
    if mode == "linear":
        linear_probe(model, images, labels, epochs, FINETUNE_LR[mode], seed)
    else:
        fit(model, model.parameters(), images, labels, F.cross_entropy, epochs, FINETUNE_LR[mode], seed, "fine-tune")
    return time.perf_counter() - start


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads ({os.cpu_count()} CPUs visible), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "assets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=None, help="where to write the benchmark (default: a temp dir)")
    parser.add_argument("--finetune", choices=["linear", "full"], default="full",
                        help="train every weight (default) or only a new head on the frozen features")
    parser.add_argument("--finetune-epochs", type=int, default=None)
    parser.add_argument("--pretrain-images", type=int, default=PRETRAIN_IMAGES)
    parser.add_argument("--pretrain-epochs", type=int, default=PRETRAIN_EPOCHS)
    parser.add_argument("--backbone", type=Path, default=None,
                        help="reuse a pretrained backbone saved by --save-backbone instead of pretraining")
    parser.add_argument("--save-backbone", type=Path, default=None, help="also save the pretrained model here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the shipped weights "
                        "were trained so, and another count may round differently)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    total_start = time.perf_counter()
    if args.backbone:
        saved = torch.load(args.backbone, map_location="cpu")
        kwargs = {**SCENES_MODEL_KWARGS, "num_classes": PRETRAIN_OBJECTS + len(BACKGROUNDS)}
        model = timm.create_model(SCENES_MODEL_NAME, pretrained=False, **kwargs)
        model.load_state_dict(saved["state_dict"])
        pre_stats = {**saved["stats"], "reused_from": args.backbone.name}
    else:
        model, pre_stats = pretrain(args.seed, args.pretrain_images, args.pretrain_epochs)
        if args.save_backbone:
            args.save_backbone.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": model.state_dict(), "stats": pre_stats}, args.save_backbone)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folders = ensure_scenes_data(args.data_dir or tmp, tuple(SPLITS), seed=args.seed)
        data = {split: load_split(folder) for split, folder in folders.items()}
        data_seconds = time.perf_counter() - start

    ft_seconds = finetune(model, *data["train"], args.finetune, args.seed, args.finetune_epochs)
    accuracies = {split: accuracy(model, *tensors) for split, tensors in data.items()}
    print("accuracy:", json.dumps(accuracies), flush=True)
    with tempfile.TemporaryDirectory() as tmp:  # the CI form: what tests/test_scenes.py checks exactly
        reduced = {split: accuracy(model, *load_split(folder))
                   for split, folder in ensure_scenes_data(tmp, tuple(SPLITS), seed=args.seed, reduced=True).items()}
    print("accuracy on the reduced splits:", json.dumps(reduced), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().float().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, args.out / "scenes_vit.pth")
    card = {"model_name": SCENES_MODEL_NAME, "model_kwargs": SCENES_MODEL_KWARGS,
            "load_kwargs": {"pretrained_cfg_overlay": {"crop_pct": 1.0}}, "classes": list(CLASSES),
            "seed": args.seed, "generator_version": GENERATOR_VERSION, "p_aligned_train": P_ALIGNED,
            "pretraining": {"task": f"{PRETRAIN_OBJECTS} blueprint objects + {len(BACKGROUNDS)} background families "
                                    "(independent labels), image and per-patch cross-entropies summed; the dense "
                                    "head is dropped after", **pre_stats},
            "finetuning": {"mode": args.finetune, "epochs": args.finetune_epochs or FINETUNE_EPOCHS[args.finetune],
                           "lr": FINETUNE_LR[args.finetune], "train_seconds": round(ft_seconds, 1)},
            "data_seconds": round(data_seconds, 1), "total_seconds": round(time.perf_counter() - total_start, 1),
            "machine": machine(), "accuracy": accuracies, "accuracy_reduced": reduced}
    (args.out / "scenes_vit.json").write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main()
