"""Train the demo ViT on the planted-shortcut data, so that it learns the background shortcut.

    python -m cigma_ray.demo.train [--out DIR] [--epochs N] [--seed S] [--data-dir DIR]

Writes DIR/demo_vit.pth (a plain fp32 state_dict) and DIR/demo_vit.json (its card, with the
accuracies on every split). Runs on two CPU cores in a few minutes.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import normalize, to_tensor

from ..data.demo import CLASSES, GENERATOR_VERSION, SPLITS, ensure_demo_data

DEMO_MODEL_NAME = "vit_tiny_patch16_224"
DEMO_MODEL_KWARGS = dict(img_size=64, patch_size=8, embed_dim=64, depth=6, num_heads=4, num_classes=4)
MEAN = STD = (0.5, 0.5, 0.5)  # timm's ViT defaults
BATCH_SIZE = 64
LR = 5e-4  # 1e-3 can leave the from-scratch ViT stuck at chance
WEIGHT_DECAY = 0.05


def load_split(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of an ImageFolder split as normalised tensors, and their labels.

    timm's eval transform, which the tool uses, also resizes to 71 px and centre-crops 64 px;
    the shapes keep clear of the border, so accuracy moves by at most half a point under it.
    """
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((folder / name).glob("*.png")):
            image = to_tensor(Image.open(path).convert("RGB"))
            images.append(normalize(image, MEAN, STD))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    preds = torch.cat([model(batch).argmax(1) for batch in images.split(256)])
    return float((preds == labels).float().mean())


def train(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> None:
    """AdamW with a one-epoch warm-up and cosine decay; random horizontal flips are the only augmentation."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(images) // BATCH_SIZE)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / steps_per_epoch) * 0.5 * (1 + np.cos(np.pi * s / total)))
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=gen)
        seen = correct = 0
        for idx in order.split(BATCH_SIZE):
            x, y = images[idx], labels[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            correct += int((logits.argmax(1) == y).sum())
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, running train acc {correct / seen:.3f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "assets")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=None, help="where to write the data (default: a temp dir)")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folders = ensure_demo_data(args.data_dir or tmp, tuple(SPLITS), seed=args.seed)
        data = {split: load_split(folder) for split, folder in folders.items()}

    model = timm.create_model(DEMO_MODEL_NAME, pretrained=False, **DEMO_MODEL_KWARGS)
    start = time.perf_counter()
    train(model, *data["train"], epochs=args.epochs, seed=args.seed)
    train_seconds = time.perf_counter() - start
    accuracies = {split: accuracy(model, *tensors) for split, tensors in data.items()}
    print("accuracy:", json.dumps(accuracies))

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "demo_vit.pth")
    card = {"model_name": DEMO_MODEL_NAME, "model_kwargs": DEMO_MODEL_KWARGS, "classes": list(CLASSES),
            "seed": args.seed, "epochs": args.epochs, "generator_version": GENERATOR_VERSION,
            "train_seconds": round(train_seconds, 1), "accuracy": accuracies}
    (args.out / "demo_vit.json").write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main()
