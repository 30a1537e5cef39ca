"""What every Hugging Face adapter shares: finding the model's directory (local, a cached copy of an
object-storage URL, or the local hub cache), its fingerprint, its image transform, its attention
heads, GPU placement, and the hf: options of a ModelSpec.

Weights are never downloaded: on a cluster every replica would fetch tens of gigabytes, so a
bare hub id must already be in the local Hugging Face cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable

import torch
from torch import nn

from ..base import HeadAdapter, HeadGates, ModelError, ModelSpec

HEAD_CHOICES = ("vision", "vision+text")
CACHE_ENV = "CIGMA_RAY_CACHE"  # where object-storage models are copied (default ~/.cache/cigma-ray)
COMPLETE = ".complete"  # in a cached copy: every file is there
log = logging.getLogger(__name__)
OUTPUT_PROJECTIONS = ("out_proj", "o_proj", "projection_layer", "proj")  # CLIP/SigLIP, Llama/Qwen, InternViT, timm


def model_type(path: str) -> str:
    """config.json's model_type, the key of ADAPTERS."""
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f).get("model_type", "")


def local_path(name: str, check_config: Callable[[dict], None] | None = None) -> str:
    """A local directory holding the model: PATH itself, a cached copy of a URL, or the local hub cache of an id.
    `check_config(config.json as a dict)` runs on a URL's config.json before any other file is copied."""
    if "://" in name and not name.startswith("file://"):
        return copy_to_cache(name, check_config)
    path = name.removeprefix("file://")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelError(f"--model hf:{name}: the directory has no config.json; save the model with "
                             "save_pretrained (and its processor), or download it with `hf download ID --local-dir DIR`")
        return path
    if os.path.exists(path):
        raise ModelError(f"--model hf:{name}: is a file; pass the model's directory (config.json, weights, processor files)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, or not a valid id: the same advice
        raise ModelError(f"--model hf:{name}: no such directory, and {name!r} is not in the local Hugging Face cache; "
                         "cigma-ray never downloads weights. Download them once where there is internet "
                         f"(`hf download {name} --local-dir DIR`) and pass hf:DIR, or copy DIR to object storage "
                         "and pass hf:s3://bucket/DIR") from None


def copy_to_cache(url: str, check_config: Callable[[dict], None] | None = None) -> str:
    """This node's copy of a model directory on object storage, copied once per node.

    The processes of a node (the replicas of a cluster node) share the cache (CIGMA_RAY_CACHE, default
    ~/.cache/cigma-ray). The first to need a model takes a file lock, copies the directory into a
    temporary directory beside its final place and renames it into place when every file is there;
    the others wait on the lock, then use that copy. A copy cut short leaves only a temporary
    directory, which the next copy removes. `check_config` sees the directory's config.json first: a
    model cigma-ray cannot load is refused before tens of gigabytes of weights are copied.
    """
    import fcntl
    import glob
    import shutil
    import tempfile

    import fsspec

    cache = os.path.join(os.environ.get(CACHE_ENV) or os.path.expanduser("~/.cache/cigma-ray"), "models")
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    local = os.path.join(cache, key)
    if os.path.isfile(os.path.join(local, COMPLETE)):
        return local
    os.makedirs(cache, exist_ok=True)
    with open(local + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        if os.path.isfile(os.path.join(local, COMPLETE)):  # another process of this node copied it meanwhile
            return local
        tmp = None
        try:
            fs, root = fsspec.core.url_to_fs(url)
            root = root.rstrip("/")
            if not fs.isfile(root + "/config.json"):
                raise ModelError(f"--model hf:{url}: no config.json there; copy a save_pretrained directory to it")
            if check_config is not None:
                check_config(json.loads(fs.cat_file(root + "/config.json")))
            for stale in glob.glob(os.path.join(cache, key + ".tmp-*")):  # left by a copy cut short
                shutil.rmtree(stale, ignore_errors=True)
            tmp = tempfile.mkdtemp(prefix=key + ".tmp-", dir=cache)
            log.info("copying hf:%s to %s", url, local)
            fs.get(root + "/", tmp + "/", recursive=True)
            open(os.path.join(tmp, COMPLETE), "w").close()
            if os.path.exists(local):  # a partial copy made by an older version, without the lock
                shutil.rmtree(local)
            os.rename(tmp, local)
            tmp = None
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - missing packages, credentials, buckets: report and stop
            raise ModelError(f"--model hf:{url}: cannot copy it ({type(e).__name__}: {e})") from None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return local


def weights_fingerprint(path: str) -> str:
    """sha256 over config.json and, for each weight file, its name, size, first and last MiB.

    A full hash would read the 50 GB of a 26B model in every replica at every start; the ends of
    each file (safetensors headers, first and last tensors) change with any retraining.
    """
    h = hashlib.sha256()
    with open(os.path.join(path, "config.json"), "rb") as f:
        h.update(f.read())
    files = sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".bin", ".pt", ".pth")))
    if not files:
        raise ModelError(f"--model hf:{path}: no weight files (*.safetensors) in the directory")
    for name in files:
        size = os.path.getsize(os.path.join(path, name))
        h.update(f"{name}\t{size}\n".encode())
        with open(os.path.join(path, name), "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read())
    return "sha256-ends:" + h.hexdigest()


def image_transform(path: str, size: tuple[int, int]) -> Callable:
    """PIL image -> (3, H, W) tensor the way the model's image processor prepares one tile:
    resize (shorter side, or to the exact size), centre crop to `size`, scale to [0, 1], normalise."""
    from torchvision import transforms
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"--model hf:{path}: cannot read its image processor config ({e}); save the processor "
                         "with the model (processor.save_pretrained(DIR))") from None
    resample = getattr(proc, "resample", None)
    interpolation = transforms.InterpolationMode.BICUBIC if int(resample or 3) == 3 else transforms.InterpolationMode.BILINEAR
    sizes = getattr(proc, "size", None) or {}
    shortest = sizes.get("shortest_edge") if isinstance(sizes, dict) else getattr(sizes, "shortest_edge", None)
    resize = transforms.Resize(size[0] if shortest else size, interpolation=interpolation, antialias=True)
    return transforms.Compose([resize, transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize(list(proc.image_mean), list(proc.image_std))])


def find_heads(root: nn.Module) -> list[tuple[nn.Linear, int]]:
    """(output projection, heads) of each attention module under `root`, outermost only, in the
    order the model applies them (registration order). An attention module is one with a Linear
    named like an output projection and a head count (`num_heads`, or `config.num_attention_heads`)."""
    found, inside = [], set()
    for module in root.modules():
        if id(module) in inside:
            continue
        proj = next((getattr(module, n) for n in OUTPUT_PROJECTIONS if isinstance(getattr(module, n, None), nn.Linear)), None)
        heads = getattr(module, "num_heads", None)
        if not isinstance(heads, int):
            heads = getattr(getattr(module, "config", None), "num_attention_heads", None)
        if proj is not None and isinstance(heads, int) and not isinstance(module, nn.Linear):
            found.append((proj, heads))
            inside.update(id(m) for m in module.modules())
    return found


def device_plan(device: str | torch.device, memory: list[int], headroom: float = 0.85) -> dict | None:
    """How to place a model on this replica's GPUs: None for one device (cpu, cuda:N, or a single
    visible GPU), else from_pretrained arguments that split it over every visible GPU
    (`memory` = each one's total bytes), keeping 1 - headroom of each for activations and the cache.
    Ray makes a replica's GPUs the visible ones, so inputs go to cuda:0, the first of them."""
    device = torch.device(device)
    if device.type != "cuda" or device.index is not None or len(memory) < 2:
        return None
    return {"device_map": "auto", "max_memory": {i: int(m * headroom) for i, m in enumerate(memory)}}


def read_vision_layers(config, n_layers: int) -> int:
    """How many vision layers (of `n_layers`) can change the logits: those up to the one whose output the
    language model reads (`vision_feature_layer`: LLaVA reads the second-to-last, -2; InternVL the last). The
    heads of the layers above it are not scanned (VLMAdapter.skipped_layers)."""
    read = getattr(config, "vision_feature_layer", -1)
    return max(i if i >= 0 else n_layers + 1 + i for i in (read if isinstance(read, (list, tuple)) else [read]))


def check_spec(spec: ModelSpec) -> None:
    if spec.heads not in HEAD_CHOICES:
        raise ModelError(f"--heads {spec.heads!r}: use one of {', '.join(HEAD_CHOICES)}")
    if spec.checkpoint or spec.img_size or spec.model_kwargs or spec.num_classes not in (None, len(spec.classes)):
        raise ModelError(f"--model {spec.name}: --checkpoint, --img-size, --model-kwargs and --num-classes are timm "
                         "options; an hf: model is the saved directory, and its classes are --classes")
    if not spec.classes:
        raise ModelError(f"--model {spec.name}: needs class names (--classes FILE, one per line, or a data set "
                         "whose class folders are named by words)")
    if len(set(spec.classes)) != len(spec.classes) or not all(c.strip() for c in spec.classes):
        raise ModelError(f"--classes: names must be non-empty and distinct (got {list(spec.classes)[:10]})")


def options(spec: ModelSpec) -> dict:
    """The hf: options of a spec as run.json records them (and `spec_from_options` reads them back)."""
    return {"heads": spec.heads, "classes": list(spec.classes), "prompts": list(spec.prompts), "scoring": spec.scoring}


def spec_from_options(options: dict | None) -> dict:
    """ModelSpec keyword arguments from recorded options (none for timm runs)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in (options or {}).items()}


def spec_with_classes(spec: ModelSpec, classes: list[str]) -> ModelSpec:
    """An hf: spec without class names takes the data's (word-named class folders); other specs are unchanged."""
    import dataclasses

    if spec.family != "hf" or spec.classes or not classes or all(c.isdigit() for c in classes):
        return spec
    return dataclasses.replace(spec, classes=tuple(classes))


class HFAdapter(HeadAdapter):
    """Shared by the hf adapters: heads from explicit (projection, heads) pairs, with labels."""

    def __init__(self, model: nn.Module, layers: dict[str, list[tuple[nn.Linear, int]]], input_size: tuple[int, int]):
        self.model = model
        pairs = [pair for part in layers.values() for pair in part]
        self.gates = HeadGates(pairs)
        self._labels = [f"{part}.{i}" for part, found in layers.items() for i in range(len(found))]
        self.input_size = input_size

    @property
    def layer_labels(self) -> list[str]:
        return self._labels
