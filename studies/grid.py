"""The architecture x configuration grid: resumable bookkeeping of its runs, and the report built from them.

Training (scripts/04_train_classifiers.py and the studies): every model's run folder gets a `grid.json` holding its
training configuration (classifiers.train.TrainConfig less the folder) and, once the model is trained and evaluated,
the sha256 of its `best.safetensors`. A model whose record says done (and whose weights still match) is skipped; any
other is resumed; a folder trained with another configuration is an error rather than silently mixed. This record is
the one place that decides whether a classifier run is up to date. After each model the grid's evaluation table is
rebuilt from every finished run, so results appear as models finish.

Report (scripts/08_report.py): one row per model with AUC (95% CI), sensitivity and specificity at the threshold
chosen on `val`, on each evaluation set; a heatmap of AUC; the change in AUC of each augmentation against
`original` for the same architecture, with a paired bootstrap 95% CI on the same images (and the mean over
architectures with the same resamples); confusion matrices and Grad-CAM galleries per model.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from classifiers.evaluate import evaluation_groups
from data.atomic import atomic_write_csv, atomic_write_text
from data.config import Runtime, to_json
from data.configs import CONFIGS
from data.manifest import file_sha256, read_manifest, stratified_subset
from data.paths import ROOT
from evaluation import plots
from evaluation.metrics import auc, bootstrap_aucs, ci

if TYPE_CHECKING:
    from classifiers.train import TrainConfig

T = TypeVar("T")

BASELINE = "all_malignant_baseline"
# Column prefix in the report -> the evaluation set: its name in evaluation_groups(), and (dataset, split) as
# predictions.csv records them.
EVAL_SETS: dict[str, dict[str, str]] = {
    "ham10000_test": {"group": "ham10000/test", "dataset": "ham10000", "split": "test"},
    "isic2017_val": {"group": "isic2017/external-val", "dataset": "isic2017", "split": "external"}}
EVAL_GROUPS = [s["group"] for s in EVAL_SETS.values()]
REPORTED = ("auc", "auc_ci_low", "auc_ci_high", "sensitivity", "specificity", "n", "n_malignant")


class GridError(RuntimeError):
    """A run folder that the grid cannot continue safely; the message names the folder."""


def run_name(arch: str, config: str, seed: int) -> str:
    return f"{arch}_{config}_s{seed}"


def select_eval_sets(df: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """The manifest rows of the named evaluation groups (e.g. ham10000/test, isic2017/external-val)."""
    groups = evaluation_groups(df)
    missing = [n for n in names if n not in groups]
    if missing:
        raise GridError(f"evaluation sets {missing} are not in the manifest; it has {sorted(groups)}")
    return pd.concat([groups[n] for n in names])


def eval_rows(manifest: Path, limit: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Every EVAL_SETS group of the manifest (with `limit`, a seeded stratified subset of each: quick runs)."""
    df = read_manifest(manifest)
    groups = [select_eval_sets(df, [s["group"]]) for s in EVAL_SETS.values()]
    return pd.concat([stratified_subset(g, limit, seed) if limit else g for g in groups])


def _record(run: Path) -> dict[str, Any] | None:
    path = run / "grid.json"
    return json.loads(path.read_text()) if path.is_file() else None


def identity(cfg: TrainConfig) -> dict[str, Any]:
    """What makes a run, as grid.json records it: the config less its output paths, with paths inside the repository
    relative to it (so `runs/grid`, its absolute spelling and a run started from another folder name the same run)."""
    def relative(v: Any) -> Any:
        return str(Path(v).relative_to(ROOT)) if isinstance(v, str) and Path(v).is_absolute() and \
            Path(v).is_relative_to(ROOT) else v

    return {k: relative(v) for k, v in to_json(cfg).items() if k not in ("out", "cv_summary")}


def _differences(a: dict[str, Any], b: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k))


def run_status(run: Path, cfg: TrainConfig) -> str:
    """'done' (trained and evaluated, weights unchanged), 'resume' (started by the grid) or 'new'; an error for a
    folder trained with another configuration, or on a manifest that has been rebuilt since."""
    record = _record(run)
    if record is None:
        if (run / "state.pt").exists() or (run / "best.json").exists():
            raise GridError(f"{run}: holds a run that the grid did not start (no grid.json); move it away or use "
                            f"another --runs-dir")
        return "new"
    from classifiers.train import TrainConfig

    wanted = identity(cfg)
    # a setting added to TrainConfig after the run was recorded counts as its default (what the run trained with)
    recorded = record.get("train_config")
    if recorded is not None:
        recorded = {**{k: v for k, v in identity(TrainConfig()).items() if k not in recorded}, **recorded}
    if recorded != wanted:
        differ = _differences(recorded or {}, wanted)
        raise GridError(f"{run}: was trained with another configuration ({differ}); "
                        f"remove the folder to retrain it with the current one, or use another --runs-dir")
    if not is_done(run):
        return "resume"
    manifest = ROOT / wanted["manifest"] if wanted.get("manifest") else None
    sidecar = json.loads((run / "best.json").read_text()) if (run / "best.json").is_file() else {}
    trained_on = sidecar.get("manifest_sha256")
    if manifest is not None and manifest.is_file() and trained_on and file_sha256(manifest) != trained_on:
        raise GridError(f"{run}: was trained on another version of {manifest.name} (rebuilt since); remove the "
                        f"folder to retrain it on the current one")
    return "done"


def is_done(run: Path) -> bool:
    """Trained and evaluated by the grid, with the best weights unchanged since."""
    record, best = _record(run), run / "best.safetensors"
    return bool(record and record.get("best_sha256") and best.is_file()
                and file_sha256(best) == record["best_sha256"] and (run / "evaluation" / "metrics.csv").is_file())


def mark(run: Path, cfg: TrainConfig, done: bool = False) -> None:
    record = {"arch": cfg.arch, "config": cfg.config, "seed": cfg.seed, "train_config": identity(cfg),
              "best_sha256": file_sha256(run / "best.safetensors") if done else None}
    atomic_write_text(run / "grid.json", json.dumps(record, indent=2) + "\n")


def train_and_evaluate(cfg: TrainConfig, rt: Runtime, evaluate: Callable[[], T], label: str) -> T | None:
    """One model of a grid, resumably: skip it when done; else record it (grid.json), train or resume it, evaluate
    it, and mark it done with its weights' sha256. Returns evaluate's result, or None for a model already done."""
    from classifiers.train import train

    run = cfg.run_dir
    status = run_status(run, cfg)
    print(f"== {label}: {status}", flush=True)
    if status == "done":
        return None
    run.mkdir(parents=True, exist_ok=True)
    mark(run, cfg)
    train(cfg, replace(rt, resume=True))
    result = evaluate()
    mark(run, cfg, done=True)
    return result


def collect(runs_dir: Path, out: Path) -> pd.DataFrame:
    """Rebuild the grid's evaluation table (all rows of every finished run's evaluation/metrics.csv)."""
    parts = []
    for run in sorted(Path(runs_dir).iterdir()) if Path(runs_dir).is_dir() else []:
        record = _record(run)
        if record and is_done(run):
            log = run / "metrics.csv"  # the per-epoch training log: its seconds are the model's training time
            seconds = float(pd.read_csv(log)["epoch_seconds"].sum()) if log.is_file() else float("nan")
            parts.append(pd.read_csv(run / "evaluation" / "metrics.csv").assign(
                run=run.name, arch=record["arch"], seed=record["seed"], train_minutes=seconds / 60))
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    atomic_write_csv(out, table)
    return table


def grid_table(evaluation: pd.DataFrame) -> pd.DataFrame:
    """One row per model (and one for the all-malignant baseline): the REPORTED metrics on each EVAL_SET."""
    if "run" not in evaluation.columns:
        raise GridError("the grid's evaluation table holds no finished model yet (run step 4)")
    rows: dict[str, dict[str, Any]] = {}
    for prefix, s in EVAL_SETS.items():
        dataset, split = s["group"].split("/")
        part = evaluation[(evaluation["dataset"] == dataset) & (evaluation["split"] == split)]
        for r in part.itertuples(index=False):
            key = BASELINE if r.model == BASELINE else r.run
            row = rows.setdefault(key, {"model": key, "arch": "" if key == BASELINE else r.arch,
                                        "config": "" if key == BASELINE else r.config,
                                        "threshold": r.threshold, "threshold_split": r.threshold_split,
                                        "train_minutes": None if key == BASELINE else r.train_minutes})
            row.update({f"{prefix}_{m}": getattr(r, m) for m in REPORTED})
    table = pd.DataFrame(list(rows.values()))
    models = table[table["model"] != BASELINE]
    twins = models[models.duplicated(["arch", "config"], keep=False)]
    if len(twins):
        raise GridError(f"several models for one architecture and configuration ({', '.join(twins['model'])}); "
                        f"the report compares one model per cell: give each training seed its own --runs-dir")
    order = {c: i for i, c in enumerate([*CONFIGS, *dict.fromkeys(evaluation["arch"])])}
    models = table[table["model"] != BASELINE].sort_values(["config", "arch"], key=lambda col: col.map(order))
    return pd.concat([models, table[table["model"] == BASELINE]], ignore_index=True)


def auc_heatmap(table: pd.DataFrame, path: Path) -> Path:
    """AUC (with its 95% CI in each cell), architecture x configuration, one panel per evaluation set."""
    models = table[table["model"] != BASELINE]
    archs = list(dict.fromkeys(models["arch"]))
    configs = [c for c in CONFIGS if c in set(models["config"])]
    fig, axes = plt.subplots(1, len(EVAL_SETS), figsize=((2.2 + 1.2 * len(configs)) * len(EVAL_SETS),
                                                         1.4 + 0.6 * len(archs)), squeeze=False)
    for ax, (prefix, s) in zip(axes[0], EVAL_SETS.items()):
        cells = models.set_index(["arch", "config"])
        values = np.full((len(archs), len(configs)), np.nan)
        for i, arch in enumerate(archs):
            for j, config in enumerate(configs):
                if (arch, config) not in cells.index:
                    continue
                r = cells.loc[(arch, config)]
                values[i, j] = r[f"{prefix}_auc"]
                ax.text(j, i, f"{r[f'{prefix}_auc']:.3f}\n[{r[f'{prefix}_auc_ci_low']:.2f}, "
                              f"{r[f'{prefix}_auc_ci_high']:.2f}]", ha="center", va="center", fontsize=8,
                        color=plots.auc_text_colour(values[i, j]))
        image = plots.auc_image(ax, values)
        ax.set(xticks=range(len(configs)), xticklabels=configs, yticks=range(len(archs)), yticklabels=archs,
               title=f"AUC on {s['group']} (95% CI)")
        ax.tick_params(axis="x", rotation=30)
        fig.colorbar(image, ax=ax, fraction=0.04)
    return plots.save_figure(fig, path)


def read_predictions(runs_dir: Path, model: str, prefix: str) -> pd.DataFrame:
    """One model's predictions on one evaluation set: path, y, prob_malignant, pred."""
    s = EVAL_SETS[prefix]
    path = Path(runs_dir) / model / "evaluation" / "predictions.csv"
    df = pd.read_csv(path)
    df = df[(df["dataset"] == s["dataset"]) & (df["split"] == s["split"])]
    return df.assign(y=(df["label"] == "malignant").astype(int))[["path", "y", "prob_malignant", "pred"]]


def _change(y: np.ndarray, augmented: list[np.ndarray], original: list[np.ndarray],
            boot_aug: list[np.ndarray], boot_orig: list[np.ndarray]) -> dict[str, float]:
    """Mean over architectures of AUC(augmented) - AUC(original), with the 95% CI of the same mean over resamples."""
    a, o = np.mean([auc(y, s) for s in augmented]), np.mean([auc(y, s) for s in original])
    lo, hi = ci(np.mean(boot_aug, axis=0) - np.mean(boot_orig, axis=0))
    return {"auc_original": o, "auc_augmented": a, "auc_change": a - o, "ci_low": float(lo), "ci_high": float(hi)}


def budget(runs_dir: Path, model: str, also_ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """A grid model's training configuration less the fields naming its data (and `also_ignore`): what must match
    for two models to be compared."""
    named = {"config", "manifest", *also_ignore}
    return {k: v for k, v in _record(Path(runs_dir) / model)["train_config"].items() if k not in named}


def auc_changes(table: pd.DataFrame, runs_dir: Path, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """For each augmentation, evaluation set and architecture trained on both it and `original` with the same
    budget: AUC(augmented) - AUC(original) on the same images with a paired bootstrap 95% CI; then the mean over the
    architectures trained on every configuration of the grid (the same ones in every row), its CI from the same
    resamples. Every model's bootstrap AUCs are computed once."""
    models = table[table["model"] != BASELINE].set_index(["arch", "config"])["model"]
    configs = set(models.index.get_level_values(1))
    complete = [a for a in dict.fromkeys(models.index.get_level_values(0))
                if all((a, c) in models.index for c in configs)]
    for arch, config in models.index:
        if config != "original" and (arch, "original") in models.index:
            aug, orig = (budget(runs_dir, models[(arch, c)]) for c in (config, "original"))
            if aug != orig:
                raise GridError(f"{models[(arch, config)]} and {models[(arch, 'original')]} were trained with "
                                f"different budgets ({_differences(aug, orig)}): not comparable")
    rows = []
    for prefix, s in EVAL_SETS.items():
        wide = None
        for model in models:
            p = read_predictions(runs_dir, model, prefix)[["path", "y", "prob_malignant"]]
            p = p.rename(columns={"prob_malignant": model})
            wide = p if wide is None else wide.merge(p, on=["path", "y"], how="outer", validate="1:1")
        if wide is None or wide.isna().any().any():
            raise GridError(f"{s['group']}: the models were not all evaluated on the same images")
        y = wide["y"].to_numpy()
        boots: dict[str, np.ndarray] = {}

        def scores(model: str) -> tuple[np.ndarray, np.ndarray]:
            if model not in boots:
                boots[model] = bootstrap_aucs(y, wide[model].to_numpy(), n_boot, seed)
            return wide[model].to_numpy(), boots[model]

        for config in [c for c in CONFIGS if c != "original" and c in configs]:
            archs = [a for a in dict.fromkeys(models.index.get_level_values(0))
                     if (a, config) in models.index and (a, "original") in models.index]
            pairs = {a: (*scores(models[(a, config)]), *scores(models[(a, "original")])) for a in archs}
            common = {"config": config, "eval_set": s["group"], "n": len(y), "n_malignant": int(y.sum())}
            for arch, (aug, boot_aug, orig, boot_orig) in pairs.items():
                rows.append({"arch": arch, **common, **_change(y, [aug], [orig], [boot_aug], [boot_orig])})
            if len(complete) > 1 and "original" in configs:
                aug, boot_aug, orig, boot_orig = (list(column) for column in zip(*(pairs[a] for a in complete)))
                rows.append({"arch": f"mean of {len(complete)}", **common,
                             **_change(y, aug, orig, boot_aug, boot_orig)})
    return pd.DataFrame(rows)


def seed_changes(table: pd.DataFrame, runs_dir: Path, seeds_dir: Path, n_boot: int = 1000,
                 seed: int = 0) -> pd.DataFrame:
    """The noise floor of every change above: each finished run in `seeds_dir` (a grid model retrained with another
    training seed, nothing else changed) against its twin in the grid, AUC(other seed) - AUC(grid seed) on the same
    images with a paired bootstrap 95% CI."""
    models = table[table["model"] != BASELINE].set_index(["arch", "config"])["model"]
    rows = []
    for run in sorted(Path(seeds_dir).iterdir()) if Path(seeds_dir).is_dir() else []:
        record = _record(run)
        if not (record and is_done(run)) or (record["arch"], record["config"]) not in models.index:
            continue
        twin = models[(record["arch"], record["config"])]
        if budget(seeds_dir, run.name, ("seed",)) != budget(runs_dir, twin, ("seed",)):
            raise GridError(f"{run} and {twin} differ in more than the training seed: not a noise floor")
        for prefix, s in EVAL_SETS.items():
            pair = read_predictions(seeds_dir, run.name, prefix).merge(
                read_predictions(runs_dir, twin, prefix), on=["path", "y"], validate="1:1", suffixes=("", "_twin"))
            y, other, grid_seed = (pair[c].to_numpy() for c in ("y", "prob_malignant", "prob_malignant_twin"))
            change = _change(y, [other], [grid_seed], [bootstrap_aucs(y, other, n_boot, seed)],
                             [bootstrap_aucs(y, grid_seed, n_boot, seed)])
            rows.append({"model": run.name, "twin": twin, "arch": record["arch"], "config": record["config"],
                         "eval_set": s["group"], "n": len(y), "auc_grid_seed": change["auc_original"],
                         "auc_other_seed": change["auc_augmented"], "auc_change": change["auc_change"],
                         "ci_low": change["ci_low"], "ci_high": change["ci_high"]})
    return pd.DataFrame(rows)


def auc_change_plot(changes: pd.DataFrame, path: Path, seeds: pd.DataFrame | None = None) -> Path:
    """Forest plot: each augmentation's change in AUC against `original` with its 95% CI, per evaluation set; with
    `seeds` (seed_changes), a grey band spans the changes that a new training seed alone made."""
    sets = list(dict.fromkeys(changes["eval_set"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 0.9 + 0.32 * len(changes) / len(sets)),
                             squeeze=False, sharey=True)
    for ax, name in zip(axes[0], sets):
        part = changes[changes["eval_set"] == name].reset_index(drop=True)
        labels = [f"{r.config} / {r.arch}" for r in part.itertuples()]
        ax.errorbar(part["auc_change"], range(len(part)), xerr=[part["auc_change"] - part["ci_low"],
                                                                  part["ci_high"] - part["auc_change"]],
                    fmt="o", capsize=3)
        ax.axvline(0, color="k", lw=0.8, ls="--")
        noise = seeds.loc[seeds["eval_set"] == name, "auc_change"] if seeds is not None else pd.Series(dtype=float)
        xlabel = "AUC(augmented) - AUC(original)"
        if len(noise):
            ax.axvspan(min(0.0, noise.min()), max(0.0, noise.max()), color="0.85", zorder=0)
            xlabel += f"\ngrey: a new training seed alone ({len(noise)} models)"
        ax.set(yticks=range(len(part)), yticklabels=labels, xlabel=xlabel,
               title=f"{name} (paired bootstrap 95% CI)")
        ax.invert_yaxis()
    return plots.save_figure(fig, path)


def confusion_matrix_pngs(table: pd.DataFrame, runs_dir: Path, out_dir: Path) -> list[Path]:
    """One PNG per model: its confusion matrix on each evaluation set at the val-chosen threshold."""
    written = []
    for model in table.loc[table["model"] != BASELINE, "model"]:
        panels = {}
        for prefix, s in EVAL_SETS.items():
            p = read_predictions(runs_dir, model, prefix)
            panels[f"{model}\n{s['group']}"] = (p["y"], p["pred"])
        written.append(plots.confusion_matrices(panels, Path(out_dir) / f"{model}.png"))
    return written


def gradcam_galleries(table: pd.DataFrame, runs_dir: Path, out_dir: Path, per_group: int, device) -> list[Path]:
    """One Grad-CAM gallery per model (true positives, false negatives, false positives on HAM10000 test)."""
    from classifiers.gradcam import write_gallery
    from classifiers.models import load_classifier

    written = []
    for model in table.loc[table["model"] != BASELINE, "model"]:
        classifier, meta = load_classifier(Path(runs_dir) / model / "best.safetensors")
        p = read_predictions(runs_dir, model, "ham10000_test").reset_index(drop=True)
        written.append(write_gallery(classifier.to(device), meta, p, meta["malignant_threshold"], per_group,
                                     Path(out_dir) / f"{model}_ham10000_test.png"))
    return written


def markdown(df: pd.DataFrame, digits: int = 3) -> str:
    """A pipe table (no extra dependency)."""
    def cell(v: Any) -> str:
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def ci_cells(point, low, high, signed: bool = False) -> list[str]:
    """'value (CI low to CI high)' per row, with signs for changes; empty where the value is missing."""
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return [f"{fmt.format(v)} ({fmt.format(lo)} to {fmt.format(hi)})" if pd.notna(v) else ""
            for v, lo, hi in zip(point, low, high)]


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """The grid table in words: 'AUC [CI]', sensitivity and specificity per evaluation set."""
    out = table[["model"]].copy()
    for prefix in EVAL_SETS:
        out[f"{prefix} AUC (95% CI)"] = auc_cells(table, prefix)
        out[f"{prefix} sens"] = table[f"{prefix}_sensitivity"]
        out[f"{prefix} spec"] = table[f"{prefix}_specificity"]
    out["training minutes"] = [f"{m:.1f}" if pd.notna(m) else "" for m in table["train_minutes"]]
    return out


def auc_cells(table: pd.DataFrame, prefix: str) -> list[str]:
    """'AUC (CI low-CI high)' of each row on one evaluation set."""
    return [f"{a:.3f} ({lo:.3f}-{hi:.3f})" for a, lo, hi in
            zip(table[f"{prefix}_auc"], table[f"{prefix}_auc_ci_low"], table[f"{prefix}_auc_ci_high"])]


def auc_by_arch(table: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """'AUC (CI)' on one evaluation set, one row per architecture and one column per configuration."""
    models = table[table["model"] != BASELINE]
    cells = models.assign(cell=auc_cells(models, prefix))
    wide = cells.pivot(index="arch", columns="config", values="cell").fillna("")
    wide = wide.reindex(index=list(dict.fromkeys(models["arch"])), columns=[c for c in CONFIGS if c in wide.columns])
    return wide.reset_index().rename_axis(columns=None)


def changes_by_arch(changes: pd.DataFrame, seeds: pd.DataFrame | None = None) -> pd.DataFrame:
    """'change (CI)' against `original`, one row per evaluation set and architecture (the mean last), one column per
    augmented configuration, and beside them the noise floor: each seed change of that architecture on `original`."""
    def cells(df: pd.DataFrame) -> list[str]:
        return ci_cells(df["auc_change"], df["ci_low"], df["ci_high"], signed=True)
    rows = changes.assign(row=changes["eval_set"] + ": " + changes["arch"], cell=cells(changes))
    wide = rows.pivot(index="row", columns="config", values="cell").fillna("")
    wide = wide.reindex(index=list(dict.fromkeys(rows["row"])), columns=[c for c in CONFIGS if c in wide.columns])
    if seeds is not None and len(seeds):
        floor = seeds[seeds["config"] == "original"]
        floor = floor.assign(row=floor["eval_set"] + ": " + floor["arch"], cell=cells(floor))
        wide["new seed alone (`original`)"] = floor.groupby("row", sort=False)["cell"].agg(", ".join)
    return wide.fillna("").reset_index().rename(columns={"row": ""}).rename_axis(columns=None)


def write_report(path: Path, command: str, table: pd.DataFrame, changes: pd.DataFrame,
                 seeds: pd.DataFrame | None = None) -> None:
    text = [f"# Classifier grid\n\nCommand: `{command}`\n", markdown(summary(table)), ""]
    for prefix, s in EVAL_SETS.items():
        text += [f"## AUC (95% CI) on {s['group']}, architecture x configuration\n",
                 markdown(auc_by_arch(table, prefix)), ""]
    text += ["## Change in AUC against `original` (paired bootstrap 95% CI, same images)\n"]
    cols = ["config", "arch", "eval_set", "n", "auc_original", "auc_augmented", "auc_change", "ci_low", "ci_high"]
    text.append(markdown(changes[cols]) if len(changes) else "No augmented configuration has an `original` twin.")
    if len(changes):
        text += ["", "## The same changes, architecture x configuration, beside the noise floor\n",
                 markdown(changes_by_arch(changes, seeds))]
    if seeds is not None:
        text += ["", "## Noise floor: the same model retrained with another training seed (paired bootstrap 95% CI)\n",
                 markdown(seeds) if len(seeds) else "No finished run with a twin in the grid."]
    atomic_write_text(path, "\n".join(text) + "\n")
