"""Peak host memory while loading a >= 1 GB random model, against the size of its weights.

Two loaders: `internvl_chat` (the published InternVL2 format: the published code's model from
../shared/internvl_chat, its state dict saved, loaded by cigma-ray's streaming loader) and `llava`
(transformers' format, save_pretrained, loaded by from_pretrained straight to the device). Each
load runs in a fresh process that first loads a tiny model of the same kind (so every lazy import
is done), then reads its resident memory, loads the big model on the CPU in fp32 and reads the
process's peak resident memory (ru_maxrss). The ratio (peak - before) / weights is what the issue
bounds at 1.3.

    python benchmarks/bench_load_memory.py [--kind internvl_chat llava] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURE = os.path.join(ROOT, "..", "shared", "internvl_chat", "tiny_internvl_chat_shimmed")
if not os.path.isdir(FIXTURE):
    FIXTURE = "/work/shared/internvl_chat/tiny_internvl_chat_shimmed"

CHILD = r"""
import json, resource, sys
import psutil, torch
from cigma_ray.models import ModelSpec, load
big, tiny = sys.argv[1], sys.argv[2]
classes = ("red car", "cat")
load(ModelSpec(f"hf:{tiny}", classes=classes))  # every lazy import done
before = psutil.Process().memory_info().rss
lm = load(ModelSpec(f"hf:{big}", classes=classes))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = sum(p.numel() * p.element_size() for p in lm.adapter.model.parameters())
print(json.dumps({"before": before, "peak": peak, "weights": weights, "ratio": (peak - before) / weights,
                  "after": psutil.Process().memory_info().rss}))
"""


def save_internvl_chat(path: str) -> None:
    """A ~1.2 GB published-format checkpoint: the published classes, random weights, their state dict."""
    import torch
    from transformers import AutoConfig, AutoModel

    shutil.copytree(FIXTURE, path)
    os.remove(os.path.join(path, "model.safetensors"))
    config = json.load(open(os.path.join(path, "config.json")))
    config["vision_config"].update(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16)
    config["llm_config"].update(hidden_size=1536, intermediate_size=6144, num_hidden_layers=8, num_attention_heads=12,
                                num_key_value_heads=4)
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=True)
    torch.manual_seed(0)
    model = AutoModel.from_config(cfg, trust_remote_code=True, dtype=torch.float32)
    # the published class's save_pretrained fails under transformers 5 (its _tied_weights_keys is a list);
    # its state dict written as one safetensors file is exactly what save_pretrained writes for it
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    for name in os.listdir(FIXTURE):  # the published code files next to the weights, as on the hub
        if name.endswith(".py") and not os.path.exists(os.path.join(path, name)):
            shutil.copy(os.path.join(FIXTURE, name), path)


def save_llava(path: str, tiny: bool = False) -> None:
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from transformers import LlavaProcessor

    from hf_tiny import clip_vision_config, image_processor, llama_config, tokenizer

    tok = tokenizer(("<image>",))
    text = llama_config(len(tok))
    vision = clip_vision_config()
    if not tiny:
        text.update(dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=8, num_attention_heads=12,
                         num_key_value_heads=4, head_dim=128))
        vision.update(dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16))
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    LlavaProcessor(image_processor=image_processor(), tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(path)


def measure(big: str, tiny: str) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, big, tiny], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", nargs="+", default=["internvl_chat", "llava"], choices=["internvl_chat", "llava"])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    from bench_memory_26b import machine  # this folder is on the path of a script run from it

    results = {"date": datetime.date.today().isoformat(), "device": "cpu", "precision": "fp32", "host": machine(),
               "runs": {}}
    with tempfile.TemporaryDirectory(prefix="cigma-load-") as tmp:
        for kind in args.kind:
            big = os.path.join(tmp, kind)
            if kind == "internvl_chat":
                save_internvl_chat(big)
                tiny = FIXTURE
            else:
                save_llava(big)
                tiny = os.path.join(tmp, "llava-tiny")
                save_llava(tiny, tiny=True)
            size = sum(os.path.getsize(os.path.join(big, n)) for n in os.listdir(big) if n.endswith(".safetensors"))
            r = measure(big, tiny)
            r["checkpoint_bytes"] = size
            results["runs"][kind] = r
            print(f"{kind}: weights {r['weights'] / 1e9:.2f} GB (file {size / 1e9:.2f} GB); peak host memory while "
                  f"loading {(r['peak'] - r['before']) / 1e9:.2f} GB above the {r['before'] / 1e9:.2f} GB before: "
                  f"{r['ratio']:.2f}x the weights")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"load-memory-cpu-fp32-{results['date']}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print("written", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
