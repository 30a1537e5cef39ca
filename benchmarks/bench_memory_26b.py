"""InternVL2-26B's memory per stage, from its real hyper-parameters alone: no download, no GPU.

The published config (InternViT-6B-448px-V1-5 + MLP projector + internlm2-chat-20b) is mapped
onto transformers' InternVL classes as `hf:DIR` loads it, the model is built on the meta device
(its exact parameter count), and engine.memory estimates each stage and the micro-batches that
fit an 80 GB and a 141 GB GPU. GPU numbers (image-steps/s, pairs/s, peak memory against these
estimates) need a GPU and are not measured here.

    python benchmarks/bench_memory_26b.py [--out benchmarks/results]
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
              "date": datetime.date.today().isoformat(), "host": platform.processor() or platform.machine(),
              "gpu": "none: GPU throughput and peak memory not measured", "params": counts,
              "meta_build_seconds": round(built, 2), "classes": args.classes, "stages": {}}
    for precision in ("bf16", "fp32"):
        est = estimate_memory(config, precision=precision, classes=args.classes, params=params)
        fits = {f"{gpu} x{n}": micro_batches(est, int(mem * 1e9), gpus=n)
                for gpu, mem in (("h100", 80), ("h200", 141)) for n in (1, 2)}
        result["stages"][precision] = {**est.to_dict(), "host_per_replica_gpu": host_bytes(est, on_gpu=True),
                                       "host_per_replica_cpu": host_bytes(est, on_gpu=False), "micro_batches": fits}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"memory-internvl2-26b-meta-{result['date']}.json")
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
