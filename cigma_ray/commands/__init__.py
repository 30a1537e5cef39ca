"""The commands of `cigma-ray`, one module each, found through this registry and imported only when run.

A command module has `add_arguments(parser)`, `settings(args)` (the parsed arguments checked and
turned into a typed settings object, before any model, data or cluster is touched) and
`run(settings) -> exit code` (one call into the layers below, then the printed result). To add a
command: write its module and give it a line here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Command:
    module: str
    help: str
    description: str | None = None


COMMANDS: dict[str, Command] = {
    "scan": Command("scan", "predict, select D, learn masks, scan every head, rank"),
    "status": Command("status", "what a run has finished, what is missing and what failed"),
    "show": Command("show", "print the top heads of a run with scores and intervals"),
    "demo": Command("demo", "the whole method on the built-in planted-shortcut benchmark"),
    "bench": Command("bench", "forward, paper-style loop, engine scan and mask stage rates, measured together on "
                     "random weights; saves JSON and a PNG plot",
                     "Defaults depend on --device: on cpu, vit_tiny_patch16_224 in fp32; on cuda, "
                     "vit_base_patch16_224 and vit_large_patch16_224 in bf16. Progress goes to stderr, the table to "
                     "stdout."),
    "cluster": Command("cluster", "Kubernetes (KubeRay) manifests for a scan"),
    "export": Command("export", "write a run's pruned model: timm weights with the top-K heads zeroed, and optionally "
                      "a smaller model without them",
                      "Remove the top K heads of a run's ranking (or the --heads named) from the model the run "
                      "scanned. --out gets a state dict of the same timm architecture with those heads' W_Q, W_K, W_V "
                      "rows and W_O columns zeroed (with ablation: mean, each head's mean output folded into the "
                      "output projection's bias; an hf: run's transformers model gets its heads' W_O columns zeroed "
                      "the same way), and --out.json says how to load it with plain timm. --smaller also "
                      "writes a physically smaller model (timm VisionTransformers only), loaded with "
                      "cigma_ray.models.surgery.load_smaller."),
    "report": Command("report", "an HTML page with PNG plots of a run: scores, intervals, stability, per-image masks "
                      "and counterfactuals, saliency before and after pruning",
                      "Writes RUN/report/index.html (images embedded, so the file stands alone) and the same plots as "
                      "PNG files beside it."),
    "prune": Command("prune", "remove a run's top-K heads together and evaluate against K random and K lowest-scored "
                     "heads",
                     "Evaluates the intact model, the model without the top K heads by each of the run's scores, K "
                     "random heads (several draws) and the K lowest-scored heads on each eval set: accuracy, BIR "
                     "(mean and ratio of means), NLL and ECE, with bootstrap intervals. Writes "
                     "RUN/eval/prune-kK.parquet."),
    "sweep": Command("sweep", "prune for several K; table, eval/sweep.parquet and eval/sweep.png",
                     "`prune` for each K, with a plot of accuracy and BIR against K for the top K by each score and "
                     "the controls (RUN/eval/sweep.png)."),
    "plan": Command("plan", "memory, placement, forwards and time of a scan, from a model's config.json only"),
    "screen": Command("screen", "every head's first-order estimate of its score from one forward and backward per "
                      "view and image (the gradient pre-screen), with its fidelity to the run's exact scan",
                      "Writes RUN/screen/ (per image and head), RUN/screen.parquet (per head: each score's estimate "
                      "and rank) and RUN/screen.json (fidelity: Spearman and recall of the exact top K in the "
                      "screen's top K, 2K, 4K, where the run has an exhaustive scan)."),
}


def load_command(name: str) -> ModuleType:
    """The module of a registered command (imported now, not before)."""
    return importlib.import_module(f"{__name__}.{COMMANDS[name].module}")
