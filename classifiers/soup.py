r"""Model soup: one classifier whose weights are the average of several runs fine-tuned from the same pretrained start.

    python classifiers/soup.py --checkpoints runs/lite0_light_raw/best.safetensors \
        runs/lite0_light_s1/best.safetensors runs/lite0_natural/best.safetensors --out runs/lite0_soup
    python classifiers/soup.py --checkpoints ... --uniform --out runs/lite0_uniform_soup    # average them all
    # one GPU: add --device cuda (one val pass per ingredient and per candidate soup). Several GPUs: not needed.

Why: runs fine-tuned from the same ImageNet weights with a small learning rate stay in one basin of the loss, so the
average of their weights is itself a good model and often a better one, most of all on shifted data (Wortsman et
al., 2022, "Model soups"), at the inference cost of one model where an ensemble of the same runs costs N. The greedy
soup takes the ingredients in order of their own val score and keeps each one only if the soup's val score does not
fall (the score is training's selection score, `classifiers.train.val_score`: the mean over sources of P(malignant)'s
AUC), so by construction the soup is at least as good on `val` as its best ingredient; test splits play no part.
BatchNorm running statistics are averaged like the weights (they are what the averaged network would estimate only
approximately; the val score says whether that matters). Measured here (results/pretrained/seeds/): three seeds of
the default's recipe do not soup: each average scores about the mean of its ingredients on `val`, below the best
one. Their classification heads start from different random draws, unlike the paper's soups (one shared head); two
runs continued from one checkpoint do soup (+0.001 on val), with no gain measurable on HAM10000 `calib`.

Ingredients must share the architecture, preprocessing, classes and training manifest (else an error naming the
field). Writes to --out: best.safetensors + .json (the best ingredient's sidecar with the soup's threshold and val
metrics, chosen on `val` by its rule, and a `soup` field naming every kept ingredient and its sha256), soup.csv (each
ingredient's val score and the soup's after trying it) and metrics.csv (the kept ingredients' training logs with a
`run` column, which scripts/ship_models.py copies and plots for a shipped soup). Everything is scored on the single
view; ship the soup with `scripts/ship_models.py --tta` to declare flip TTA on it.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from classifiers.evaluate import training_manifest
from classifiers.models import build_from_meta, load_classifier
from classifiers.predict import single_view
from classifiers.shipped import SHIPPING_FIELDS
from classifiers.train import revalidate
from data.atomic import atomic_write_text
from data.checkpoint import CheckpointError, file_digest, save_checkpoint
from data.paths import repo_relative
from data.runtime import UserError, add_runtime_options, cli_main, init_device

SHARED_FIELDS = ("arch", "arch_kwargs", "input_size", "resize", "normalization", "color_constancy", "class_names",
                 "manifest_sha256", "threshold_rule", "threshold_target")


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point tensors (in fp32); integer ones (BatchNorm's step counters) from the
    first state."""
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()}


def check_compatible(metas: list[dict[str, Any]], paths: list[str]) -> None:
    for field in SHARED_FIELDS:
        values = [m.get(field) for m in metas]
        if any(v != values[0] for v in values):
            raise UserError(f"the ingredients differ in {field!r} ({paths[0]}: {values[0]!r}, "
                            f"{next(p for p, v in zip(paths, values) if v != values[0])}: "
                            f"{next(v for v in values if v != values[0])!r}); a soup needs one architecture, "
                            "preprocessing and training manifest")


def make_soup(paths: list[str], device: torch.device,
              greedy: bool = True) -> tuple[torch.nn.Module, dict[str, Any], pd.DataFrame]:
    """(model, sidecar, one row per ingredient) of the greedy (or uniform) soup of `paths`."""
    loaded = [load_classifier(p) for p in paths]
    check_compatible([meta for _, meta in loaded], paths)
    nets = [single_view(model) for model, _ in loaded]
    manifest = training_manifest(loaded[0][1])
    scores = [revalidate(net, meta, manifest, device)["metrics"]["val"]["auc"] for net, (_, meta) in zip(nets, loaded)]
    order = sorted(range(len(paths)), key=lambda i: -scores[i])
    base = {k: v for k, v in loaded[order[0]][1].items() if k not in SHIPPING_FIELDS}  # scored single-view
    model = build_from_meta(base)

    def score(members: list[int]) -> dict[str, Any]:
        model.load_state_dict(average_states([nets[j].state_dict() for j in members]))
        return revalidate(model, base, manifest, device)

    kept, best = [order[0]], scores[order[0]]
    rows = [{"ingredient": repo_relative(paths[order[0]]), "ingredient_val_auc": best, "soup_val_auc": best,
             "kept": True}]
    for i in order[1:]:
        soup_auc = score(kept + [i])["metrics"]["val"]["auc"]
        keep = not greedy or soup_auc >= best
        kept, best = (kept + [i], soup_auc) if keep else (kept, best)
        rows.append({"ingredient": repo_relative(paths[i]), "ingredient_val_auc": scores[i], "soup_val_auc": soup_auc,
                     "kept": keep})
    meta = score(kept)
    meta["soup"] = {"rule": "greedy on val" if greedy else "uniform",
                    "ingredients": [{"path": repo_relative(paths[j]), "val_auc": scores[j],
                                     "sha256": file_digest(Path(paths[j]).with_suffix(".safetensors"))} for j in kept]}
    return model, meta, pd.DataFrame(rows)


@cli_main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", required=True,
                   help="classifier checkpoints fine-tuned from the same start (two or more)")
    p.add_argument("--uniform", action="store_true", help="average every ingredient instead of the greedy choice")
    p.add_argument("--out", required=True, help="output folder: best.safetensors/.json and soup.csv")
    add_runtime_options(p)
    a = p.parse_args(argv)
    if len(a.checkpoints) < 2:
        raise UserError("a soup needs at least two checkpoints")
    device = init_device(a.device, a.threads)
    try:
        model, meta, rows = make_soup(a.checkpoints, device, greedy=not a.uniform)
    except (CheckpointError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from exc
    out = Path(a.out)
    save_checkpoint(out / "best", model, meta)
    atomic_write_text(out / "soup.csv", rows.to_csv(index=False))
    logs = [pd.read_csv(log).assign(run=i["path"]) for i in meta["soup"]["ingredients"]
            if (log := Path(i["path"]).parent / "metrics.csv").is_file()]
    if logs:  # the ingredients' training logs, what scripts/ship_models.py copies beside a shipped model
        atomic_write_text(out / "metrics.csv", pd.concat(logs).to_csv(index=False))
    print(rows.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"soup of {len(meta['soup']['ingredients'])}: val AUC {meta['metrics']['val']['auc']:.4f}, threshold "
          f"{meta['malignant_threshold']:.3f} -> {out}/best.safetensors")
    return meta


if __name__ == "__main__":
    main()
