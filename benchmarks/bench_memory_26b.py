"""InternVL2-26B's memory per stage, from its real hyper-parameters alone: no download.

The published config (InternViT-6B-448px-V1-5 + MLP projector + internlm2-chat-20b) is mapped
onto transformers' InternVL classes as `hf:DIR` loads it, the model is built on the meta device
(its exact parameter count), and engine.memory estimates each stage and the micro-batches that
fit an 80 GB and a 141 GB GPU.

With `--measure` (on a GPU that holds the 51 GB of bf16 weights: an H200, or an 80 GB card for
--tiny), the same model is built with random weights on the device and a replica runs the mask
stage and the scan on random images: mask image-steps/s, scan head x image pairs/s, and the peak
memory of each stage against engine.memory's estimate, saved with the device name. `--tiny`
measures a tiny model of the same shape instead (a CPU smoke test of this path; its numbers mean
nothing).

    python benchmarks/bench_memory_26b.py [--out benchmarks/results] [--measure [--tiny] [--device cuda]]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

INTERNVL2_26B = {
    "model_type": "internvl_chat", "architectures": ["InternVLChatModel"], "downsample_ratio": 0.5,
    "force_image_size": 448, "ps_version": "v2", "select_layer": -1, "template": "internlm2-chat",
    "vision_config": {"hidden_size": 3200, "num_hidden_layers": 45, "num_attention_heads": 25, "intermediate_size": 12800,
                      "image_size": 448, "patch_size": 14, "qk_normalization": True, "norm_type": "rms_norm",
                      "qkv_bias": False},
    "llm_config": {"architectures": ["InternLM2ForCausalLM"], "hidden_size": 6144, "num_hidden_layers": 48,
                   "num_attention_heads": 48, "num_key_value_heads": 8, "intermediate_size": 16384, "vocab_size": 92553,
                   "bias": False, "max_position_embeddings": 32768, "rope_theta": 1000000,
                   "rope_scaling": {"type": "dynamic", "factor": 2.0}},
}
GB = 1 << 30
TINY = {**INTERNVL2_26B,
        "force_image_size": 56,
        "vision_config": {**INTERNVL2_26B["vision_config"], "hidden_size": 32, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "intermediate_size": 64, "image_size": 56},
        "llm_config": {**INTERNVL2_26B["llm_config"], "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 128}}


def machine() -> dict:
    """The host: CPU model, cores this process may use, memory."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_gib": round(memory / GB, 1) if memory else None}


def measure(raw: dict, device: str, classes: int, mask_steps: int = 2, images: int = 4) -> dict:
    """A replica of the model with random bf16 weights on `device`: the mask stage and the scan timed, and each
    stage's peak memory against the estimate (weights + what the stage adds)."""
    import time

    import torch
    from transformers import InternVLForConditionalGeneration

    from cigma_ray.config import Config
    from cigma_ray.engine import Replica
    from cigma_ray.engine.memory import estimate_memory, micro_batches
    from cigma_ray.models import LoadedModel
    from cigma_ray.models.hf.internvl_chat import native_config, with_defaults
    from cigma_ray.models.hf.vlm import ARCHITECTURES, VLMAdapter, VLMClassifier

    cuda = device.startswith("cuda")
    precision = "bf16" if cuda else "fp32"
    dtype = torch.bfloat16 if cuda else torch.float32
    config = native_config(with_defaults(raw), image_token_id=0)
    with torch.device("meta"):
        vlm = InternVLForConditionalGeneration._from_config(config, dtype=dtype)
    vlm.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in vlm.named_parameters():  # norms at 1, layer scales at 0.1, the rest small and random
            if p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
            elif "lambda_" in name:
                p.fill_(0.1)
            else:
                p.normal_(0.0, 0.02, generator=g)
    for name, module in list(vlm.named_modules()):  # to_empty left the rotary buffers uninitialised: compute them
        if "RotaryEmbedding" in type(module).__name__:
            parent, _, leaf = name.rpartition(".")
            with torch.device(device):
                setattr(vlm.get_submodule(parent), leaf, type(module)(config=module.config))
    assert not [n for n, b in vlm.named_buffers() if "rotary" not in n], "a buffer this benchmark does not initialise"
    vlm.eval().requires_grad_(False)
    vocab = config.text_config.vocab_size
    prompt = torch.randint(1, vocab, (24 + 3 * classes,), generator=torch.Generator().manual_seed(1))
    prefix = torch.cat([torch.tensor([1]), torch.zeros(config.image_seq_length, dtype=torch.long), prompt])[None]
    answers = [torch.randint(1, vocab, (3,), generator=torch.Generator().manual_seed(2 + c)).tolist() for c in range(classes)]
    model = VLMClassifier(vlm, ARCHITECTURES["internvl"], prefix.to(device), answers, "sequence").to(device)
    size = config.vision_config.image_size[0] if isinstance(config.vision_config.image_size, (list, tuple)) \
        else config.vision_config.image_size
    adapter = VLMAdapter(model, "vision", (size, size), placed=True)
    loaded = LoadedModel(adapter=adapter, transform=None, num_classes=classes, fingerprint={"name": "bench:internvl2-26b"})
    est = estimate_memory(config, precision=precision, params=sum(p.numel() for p in vlm.parameters()),
                          classes=classes, prefix_tokens=prefix.shape[1])
    total = torch.cuda.get_device_properties(device).total_memory if cuda else 64 * GB
    fit = micro_batches(est, total)
    micro = max(1, min(images, fit["mask"]))
    replica = Replica(loaded, device, precision, batch_size=max(1, min(64, fit["scan"])))
    x = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(3))

    def peak_since(start):
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - start
        return None

    base = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cfg = Config(mask_steps=mask_steps, mask_batch=images, mask_micro_batch=micro)
    replica.masks(x[:1], Config(mask_steps=1, mask_batch=1))  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = replica.masks(x, cfg)
    mask_seconds = time.perf_counter() - start
    mask_peak = peak_since(base)
    heads = [(layer, h) for layer in (0, config.vision_config.num_hidden_layers - 1) for h in range(2)]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    replica.scan(x, result.fg, heads, 1.0, measure_fig=True)
    scan_seconds = time.perf_counter() - start
    scan_peak = peak_since(base)
    name = torch.cuda.get_device_name(device) if cuda else machine()["cpu"]
    return {"device": name, "precision": precision, "images": images, "mask_steps": mask_steps,
            "mask_micro_batch": micro, "scan_batch": replica.batch_size, "heads": len(heads),
            "mask_image_steps_per_s": images * mask_steps / mask_seconds,
            "scan_pairs_per_s": len(heads) * images / scan_seconds, "weights_bytes": est.weights,
            "mask_peak_bytes": mask_peak, "mask_estimate_bytes": micro * est.mask_per_image,
            "scan_peak_bytes": scan_peak, "scan_estimate_bytes": replica.batch_size * est.scan_per_forward}


def main() -> int:
    import time

    import torch
    from transformers import InternVLForConditionalGeneration

    from cigma_ray.engine.memory import estimate_memory, host_bytes, micro_batches
    from cigma_ray.models.hf.internvl_chat import native_config, with_defaults
    from cigma_ray.models.hf.sizes import internvl_chat_params

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--measure", action="store_true", help="also run the mask stage and the scan on random weights")
    p.add_argument("--tiny", action="store_true", help="measure a tiny model of the same shape (a smoke test)")
    p.add_argument("--device", default="cuda", help="where --measure runs (default cuda)")
    args = p.parse_args()

    cfg = with_defaults(INTERNVL2_26B)
    config = native_config(cfg)
    start = time.perf_counter()
    with torch.device("meta"):
        model = InternVLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    built = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    counts = internvl_chat_params(INTERNVL2_26B)
    assert params == counts["total"], (params, counts)
    result = {"model": "InternVL2-26B (published hyper-parameters, random weights on the meta device)",
              "date": datetime.date.today().isoformat(), "host": machine(),
              "gpu": "none: GPU throughput and peak memory not measured", "params": counts,
              "meta_build_seconds": round(built, 2), "classes": args.classes, "stages": {}}
    for precision in ("bf16", "fp32"):
        est = estimate_memory(config, precision=precision, classes=args.classes, params=params)
        fits = {f"{gpu} x{n}": micro_batches(est, int(mem * 1e9), gpus=n)
                for gpu, mem in (("h100", 80), ("h200", 141)) for n in (1, 2)}
        result["stages"][precision] = {**est.to_dict(), "host_per_replica_gpu": host_bytes(est, on_gpu=True),
                                       "host_per_replica_cpu": host_bytes(est, on_gpu=False), "micro_batches": fits}
    if args.measure:
        m = measure(TINY if args.tiny else INTERNVL2_26B, args.device, args.classes)
        result["measured"] = {"model": "tiny (same shape; a smoke test)" if args.tiny else "InternVL2-26B", **m}
        if not args.tiny:
            result["gpu"] = m["device"]
        def gib(v):
            return "n/a" if v is None else f"{v / GB:.2f} GiB"
        print(f"measured on {m['device']} ({m['precision']}): mask {m['mask_image_steps_per_s']:.2f} image-steps/s "
              f"(micro-batch {m['mask_micro_batch']}), scan {m['scan_pairs_per_s']:.2f} pairs/s (batch {m['scan_batch']}); "
              f"peak above the weights: mask {gib(m['mask_peak_bytes'])} (estimate {gib(m['mask_estimate_bytes'])}), "
              f"scan {gib(m['scan_peak_bytes'])} (estimate {gib(m['scan_estimate_bytes'])})")
    os.makedirs(args.out, exist_ok=True)
    kind = "meta" if not args.measure else ("tiny-" if args.tiny else "") + args.device.split(":")[0]
    path = os.path.join(args.out, f"memory-internvl2-26b-{kind}-{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    for precision, s in result["stages"].items():
        print(f"{precision}: weights {s['weights'] / GB:.1f} GiB, mask {s['mask_per_image'] / GB:.2f} GiB/image, "
              f"scan {s['scan_per_forward'] / GB:.3f} GiB/forward (scoring {s['scoring_per_image'] / GB:.3f}), "
              f"host {s['host_per_replica_gpu'] / GB:.1f} GiB per GPU replica; tokens {s['tokens']}")
        for name, fit in s["micro_batches"].items():
            print(f"   {name}: mask micro-batch {fit['mask']}, scan batch {fit['scan']}, fits {fit['fits']}")
    print(f"params {counts['total'] / 1e9:.3f} B (vision {counts['vision'] / 1e9:.3f}, projector "
          f"{counts['projector'] / 1e9:.3f}, language {counts['language'] / 1e9:.3f}); written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
