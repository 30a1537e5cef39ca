"""run.json: what a run is (config, model fingerprint, data fingerprint, precision, unit plan), and
the check that refuses to mix a run with a command of other settings."""
from __future__ import annotations

import hashlib
import json

from .. import __version__
from ..config import Config
from ..models import ModelSpec, spec_from_options
from .storage import RunDir


class RunMismatch(ValueError):
    """An existing run directory was made with settings that would change its results."""


def plan_hash(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def build_manifest(config: Config, fingerprint: dict, heads_per_layer: list[int], data_url: str,
                   data_fingerprint: str, n_images: int, classes: list[str], precision: str,
                   skipped_layers: dict[int, str] | None = None) -> dict:
    """The content of run.json for a scan of this model (its loader's fingerprint) on this data.

    `skipped_layers` ({layer: why}, the adapter's) are layers whose heads cannot change the logits and
    are not scanned: model.skipped_layers says why, plan.skipped_layers lists them (only when there are
    any, so the plan hash of runs without skipped layers is what it always was)."""
    plan = {"unit_images": config.unit_images, "unit_layers": config.unit_layers, "n_images": n_images,
            "heads_per_layer": heads_per_layer}
    if skipped_layers:
        plan["skipped_layers"] = sorted(skipped_layers)
    return {
        "version": __version__,
        "config": config.to_dict(),
        "model": {**{k: fingerprint[k] for k in ("name", "model_kwargs", "img_size", "num_classes", "input_size",
                                                  "weights", "checkpoint")},
                  "options": fingerprint.get("options"), "layer_labels": fingerprint.get("layer_labels"),  # hf: only
                  "skipped_layers": {str(k): v for k, v in sorted((skipped_layers or {}).items())}},
        "data": {"url": data_url, "fingerprint": data_fingerprint, "n_images": n_images, "classes": classes},
        "precision": precision,
        "plan": {**plan, "hash": plan_hash(plan)},
    }


def check_compatible(run: RunDir, new: dict, out: str) -> None:
    """Refuse a run directory whose run.json has other result-changing settings than `new`."""
    if not run.exists("run.json"):
        return
    old = run.read_json("run.json")
    defaults = Config().to_dict()  # a key newer than the run: the run used its default
    diffs = [f"{k}: run has {old['config'].get(k, defaults[k])!r}, this command {new['config'][k]!r}"
             for k in Config.result_keys(new["config"]) if old["config"].get(k, defaults[k]) != new["config"][k]]
    for key in ("name", "model_kwargs", "num_classes", "input_size", "weights", "options"):
        if old["model"].get(key) != new["model"][key]:
            diffs.append(f"model {key}: run has {old['model'].get(key)!r}, this command {new['model'][key]!r}")
    if old["data"]["fingerprint"] != new["data"]["fingerprint"]:
        n_old, n_new = old["plan"]["n_images"], new["plan"]["n_images"]
        counts = f" ({n_new} images now, {n_old} in the run)" if n_old != n_new else ""
        diffs.append(f"data: the image listing of {new['data']['url']} differs from the one the run used "
                     f"({old['data']['url']}){counts}")
    if old["precision"] != new["precision"]:
        diffs.append(f"precision: run has {old['precision']}, this command {new['precision']}")
    # the plan is the unit sizes, the image count and the heads: name only what differs (the image count is
    # the data's line above, the heads the model's)
    units = [f"{k}: run has {old['plan'][k]}, this command {new['plan'][k]}" for k in ("unit_images", "unit_layers")
             if old["plan"][k] != new["plan"][k]]
    diffs += units
    if old["plan"]["heads_per_layer"] != new["plan"]["heads_per_layer"]:
        diffs.append(f"model heads per layer: run has {old['plan']['heads_per_layer']}, this command "
                     f"{new['plan']['heads_per_layer']}")
    if old["plan"]["hash"] != new["plan"]["hash"] and not diffs:
        diffs.append("units: the run's unit plan differs from this command's")
    if diffs:
        raise RunMismatch(f"--out {out} already holds a run with other settings:\n  " + "\n  ".join(diffs)
                          + "\nuse a new --out, or the same model, data and config to resume it")


def scanned_model_spec(meta: dict, checkpoint: str | None = None) -> ModelSpec:
    """The ModelSpec that rebuilds the model a run scanned, from its run.json (`checkpoint` if the file moved)."""
    m = meta["model"]
    return ModelSpec(name=m["name"], checkpoint=checkpoint or m["checkpoint"], num_classes=m["num_classes"],
                     img_size=m["img_size"], model_kwargs=m["model_kwargs"],
                     random_weights=m["weights"].startswith("random:"), seed=meta["config"]["seed"],
                     **spec_from_options(m.get("options")))
