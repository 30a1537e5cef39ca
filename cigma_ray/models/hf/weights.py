"""Checkpoint weights streamed into a model built on the meta device: each tensor is read once from
its safetensors file into one reused host buffer and copied straight to its device in the run's
dtype, so the host never holds a second copy of the model (peak: the weights that live on the host,
plus the largest single tensor of the checkpoint).

safetensors files are read with plain reads rather than memory maps: a mapped file's pages count
as the process's memory while it is mapped, which on a CPU replica would double the weights.
The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}} and the raw little-endian data.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ..base import ModelError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies: its file, dtype, shape and byte range in the file."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(file: str) -> dict[str, Entry]:
    """The tensors of one safetensors file, from its header alone."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ModelError(f"{file}: not a safetensors file (shorter than its header)")
        (size,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(size))
        except ValueError as e:
            raise ModelError(f"{file}: not a safetensors file ({e})") from None
    base = 8 + size
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise ModelError(f"{file}: tensor {name} has dtype {info['dtype']}, which cigma-ray does not read")
        start, end = info["data_offsets"]
        entries[name] = Entry(file, DTYPES[info["dtype"]], tuple(info["shape"]), base + start, base + end)
    return entries


def checkpoint_entries(path: str) -> dict[str, Entry]:
    """Every tensor of a model directory's safetensors checkpoint (one file, or shards with an index)."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        found = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
        raise ModelError(f"--model hf:{path}: no *.safetensors weights" + (
            f" (only {', '.join(found[:3])}: convert them once with `model.save_pretrained(DIR, safe_serialization=True)`)"
            if found else ""))
    entries: dict[str, Entry] = {}
    for name in files:
        entries.update(read_header(os.path.join(path, name)))
    return entries


def read_tensors(entries: dict[str, Entry]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every entry, file by file in file order. Each tensor is a view of one host
    buffer that the next tensor overwrites: copy it before asking for the next."""
    if not entries:
        return
    scratch = torch.empty(max(e.nbytes for e in entries.values()), dtype=torch.uint8)
    by_file: dict[str, list[tuple[str, Entry]]] = {}
    for name, e in entries.items():
        by_file.setdefault(e.file, []).append((name, e))
    for file, items in by_file.items():
        with open(file, "rb", buffering=0) as f:
            for name, e in sorted(items, key=lambda item: item[1].start):
                buf = scratch[: e.nbytes]
                view, filled = memoryview(buf.numpy()), 0
                f.seek(e.start)
                while filled < e.nbytes:  # one read() returns at most ~2 GiB on Linux
                    got = f.readinto(view[filled:])
                    if not got:
                        raise ModelError(f"{file}: ends inside tensor {name}; the file is truncated")
                    filled += got
                yield name, buf.view(e.dtype).view(e.shape) if e.nbytes else torch.empty(e.shape, dtype=e.dtype)


def device_of(device_map: dict[str, torch.device | str | int], name: str) -> torch.device:
    """The device of a parameter under an accelerate-style device map {module prefix: device}."""
    best = None
    for prefix, dev in device_map.items():
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, dev)
    if best is None:
        raise ModelError(f"the device map places no module holding {name}")
    dev = best[1]
    return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)


def materialize(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]],
                convert: Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]],
                device_map: dict, dtype: torch.dtype, source: str) -> None:
    """Fill a meta-device model from (checkpoint name, tensor) pairs.

    `convert` maps a checkpoint tensor to (model state-dict name, tensor) pairs; a pair's tensor
    may be a view of another shape with the same number of elements (a slice of a fused matrix).
    Floating-point tensors take `dtype`; every state-dict entry must be filled exactly once, and
    every checkpoint tensor must be used, or it is an error naming the keys.
    """
    state = {name: t for name, t in model.state_dict(keep_vars=True).items()}
    filled, unused = set(), []
    for name, tensor in tensors:
        targets = convert(name, tensor)
        if not targets:
            unused.append(name)
        for target, value in targets:
            if target not in state:
                raise ModelError(f"{source}: checkpoint tensor {name} maps to {target}, which the model does not have")
            if target in filled:
                raise ModelError(f"{source}: {target} is given twice by the checkpoint")
            want = state[target]
            if want.numel() != value.numel():
                raise ModelError(f"{source}: checkpoint tensor {name} has shape {tuple(tensor.shape)}, the model's "
                                 f"{target} {tuple(want.shape)}; config.json does not describe these weights")
            out = torch.empty(want.shape, dtype=dtype if want.is_floating_point() else want.dtype,
                              device=device_of(device_map, target))
            out.view(value.shape).copy_(value)
            set_tensor(model, target, out)
            filled.add(target)
    missing = sorted(set(state) - filled)
    if missing or unused:
        raise ModelError(f"{source}: the checkpoint does not fit the model: "
                         + (f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} " if missing else "")
                         + (f"unused {', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}" if unused else ""))


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def rebuild_rotary_buffers(model: nn.Module, device_map: dict) -> None:
    """Non-persistent buffers are not in checkpoints; on the meta device they hold nothing. Rotary
    embeddings (the only such buffers of these models) are built again on their device; any other
    buffer left on the meta device is an error, never uninitialised memory."""
    for name, module in list(model.named_modules()):
        if not any(b is not None and b.is_meta for b in module._buffers.values()):
            continue
        if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "config"):
            parent_name, _, leaf = name.rpartition(".")
            with torch.device(device_of(device_map, name + ".inv_freq")):
                rebuilt = type(module)(config=module.config)
            setattr(model.get_submodule(parent_name), leaf, rebuilt)
            continue
        bad = [b for b, t in module._buffers.items() if t is not None and t.is_meta]
        raise ModelError(f"{name}.{bad[0]} ({type(module).__name__}) is not in the checkpoint and cigma-ray cannot "
                         "compute it")
