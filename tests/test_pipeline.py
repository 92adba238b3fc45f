"""The numbered pipeline: presets, stamps, grid bookkeeping, and the smoke preset end to end on real images.

The end-to-end test starts `run_pipeline.py --preset smoke`, kills its whole process group while step 4 trains,
runs the same command again (finished steps are skipped, the killed model resumes), checks every output, and runs
it a third time (every step skipped). A few minutes on 2 cores with OMP_NUM_THREADS=1.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import load_script
from PIL import Image

from classifiers.train import TrainConfig
from data.manifest import file_sha256, read_manifest
from data.paths import MANIFESTS, ROOT, SCRIPTS, SHARED_DATA
from evaluation.metrics import paired_auc_difference
from studies import grid
from studies.presets import ALL_ARCHS, ALL_CONFIGS, PRESETS, Layout, Step, steps

DATA_ROOT = SHARED_DATA
run_pipeline = load_script("run_pipeline")


def test_presets_name_every_architecture_and_configuration():
    from classifiers.models import NATIVE_SIZE, list_models
    from data.configs import CONFIGS, PIPELINE

    assert sorted(ALL_ARCHS) == [a for a in list_models() if a not in NATIVE_SIZE]  # the grid's six; not the Lites
    assert ALL_CONFIGS == PIPELINE == list(CONFIGS)[:5]
    for name in ("cpu", "full"):
        assert len(PRESETS[name]["classifier"]["archs"]) * len(PRESETS[name]["classifier"]["configs"]) == 30


def test_every_step_writes_under_the_work_dir(tmp_path):
    """Steps read the data root and the code, and write nowhere but the work directory."""
    work, data = tmp_path / "work", tmp_path / "data"
    for preset in PRESETS:
        for step in steps(preset, work, data):
            for path in step.outputs:
                assert path.is_relative_to(work), (step.name, path)
            for action in step.actions:
                args = action if isinstance(action, list) else [str(a) for a in action.args]
                for arg in args[1:]:
                    if arg.startswith("/"):
                        assert Path(arg).is_relative_to(work) or Path(arg).is_relative_to(data), (step.name, arg)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def copy(source: Path, target: Path) -> None:
    write(target, source.read_text())


def test_a_step_is_up_to_date_until_an_input_or_output_changes(tmp_path):
    layout = Layout(tmp_path)
    source, product = tmp_path / "in.txt", tmp_path / "out" / "product.txt"
    write(source, "a")
    step = Step(3, "copy", [partial(copy, source, product)], [source], [product])
    assert run_pipeline.up_to_date(layout, step) == (False, "never finished")
    run_pipeline.run_step(step, "cpu", dict(os.environ))
    run_pipeline.write_stamp(layout, step, 0.1)
    assert run_pipeline.up_to_date(layout, step)[0]
    product.unlink()
    assert not run_pipeline.up_to_date(layout, step)[0]
    run_pipeline.run_step(step, "cpu", dict(os.environ))
    assert run_pipeline.up_to_date(layout, step)[0]
    write(source, "b")
    assert run_pipeline.up_to_date(layout, step) == (False, "its commands or inputs changed")
    other = Step(3, "copy", [partial(write, product, "c")], [source], [product])
    assert run_pipeline.step_key(other) != run_pipeline.step_key(step)


def test_a_failing_step_stops_the_pipeline_with_its_name(tmp_path):
    step = Step(2, "broken", [["-c", "raise SystemExit(3)"]], [], [tmp_path / "never.txt"], device=False)
    with pytest.raises(run_pipeline.StepError, match="step 2 \\(broken\\) failed with exit code 3"):
        run_pipeline.run_step(step, "cpu", dict(os.environ))
    step = Step(2, "silent", [["-c", "pass"]], [], [tmp_path / "never.txt"], device=False)
    with pytest.raises(run_pipeline.StepError, match="without writing"):
        run_pipeline.run_step(step, "cpu", dict(os.environ))


def test_grid_run_status(tmp_path):
    run = tmp_path / "densenet121_original_s0"
    cfg = TrainConfig(arch="densenet121", epochs=1, out=str(run))
    assert grid.run_status(run, cfg) == "new"
    run.mkdir()
    (run / "state.pt").write_bytes(b"x")
    with pytest.raises(grid.GridError, match="did not start"):
        grid.run_status(run, cfg)
    grid.mark(run, cfg)
    assert grid.run_status(run, cfg) == "resume"
    assert grid.run_status(run, replace(cfg, out=str(tmp_path / "elsewhere"))) == "resume"  # the folder is no part
    with pytest.raises(grid.GridError, match="another configuration \\(epochs: 1 vs 2\\)"):
        grid.run_status(run, replace(cfg, epochs=2))
    (run / "best.safetensors").write_bytes(b"weights")
    write(run / "evaluation" / "metrics.csv", "model\n")
    grid.mark(run, cfg, done=True)
    assert grid.run_status(run, cfg) == "done"
    (run / "best.safetensors").write_bytes(b"other weights")  # retrained since: evaluate again
    assert grid.run_status(run, cfg) == "resume"
    manifest = tmp_path / "original.csv"
    manifest.write_text("path,label\n")
    with_manifest = replace(cfg, manifest=str(manifest))
    grid.mark(run, with_manifest, done=True)
    write(run / "best.json", json.dumps({"manifest_sha256": file_sha256(manifest)}))
    assert grid.run_status(run, with_manifest) == "done"
    manifest.write_text("path,label\nother.jpg,benign\n")  # step 3 rebuilt the configuration
    with pytest.raises(grid.GridError, match="another version of original.csv"):
        grid.run_status(run, with_manifest)


def _evaluation(models: list[tuple[str, str, str]]) -> pd.DataFrame:
    """A grid evaluation table: (run, arch, config) models scored on every EVAL_SET."""
    rows = []
    for s in grid.EVAL_SETS.values():
        dataset, split = s["group"].split("/")
        for run, arch, config in models:
            rows.append({"dataset": dataset, "split": split, "model": run, "run": run, "arch": arch, "config": config,
                         "threshold": 0.5, "threshold_split": "val", "auc": 0.8, "auc_ci_low": 0.7,
                         "auc_ci_high": 0.9, "sensitivity": 0.9, "specificity": 0.5, "n": 10, "n_malignant": 5,
                         "train_minutes": 1.0})
    return pd.DataFrame(rows)


def test_grid_report_refuses_two_models_in_one_cell_and_unequal_budgets(tmp_path):
    seeds = _evaluation([("densenet121_original_s0", "densenet121", "original"),
                         ("densenet121_original_s1", "densenet121", "original")])
    with pytest.raises(grid.GridError, match="several models for one architecture and configuration"):
        grid.grid_table(seeds)
    pair = grid.grid_table(_evaluation([("densenet121_original_s0", "densenet121", "original"),
                                        ("densenet121_dcgan_aug_s0", "densenet121", "dcgan_aug")]))
    for config, epochs in (("original", 3), ("dcgan_aug", 5)):
        run = tmp_path / f"densenet121_{config}_s0"
        grid.mark(run, TrainConfig(arch="densenet121", config=config, manifest=f"m/{config}.csv", out=str(run),
                                   epochs=epochs))
    with pytest.raises(grid.GridError, match="different budgets \\(epochs: 5 vs 3\\)"):
        grid.auc_changes(pair, tmp_path)


def test_grid_records_paths_inside_the_repository_relative_to_it(tmp_path):
    inside = str(MANIFESTS / "original.csv")
    assert grid.identity(TrainConfig(manifest=inside))["manifest"] == "data/manifests/original.csv"
    assert grid.identity(TrainConfig(manifest=str(tmp_path)))["manifest"] == str(tmp_path)  # outside: absolute


def _finished_run(runs: Path, arch: str, config: str, seed: int, prob: np.ndarray, epochs: int = 3) -> str:
    """A run folder as step 4 leaves it: grid.json (done), weights, evaluation/metrics.csv and predictions.csv."""
    name, y = grid.run_name(arch, config, seed), np.arange(len(prob)) % 2
    run = runs / name
    write(run / "best.safetensors", f"weights {name}")
    write(run / "evaluation" / "metrics.csv", "model\n")
    rows = [{"dataset": s["dataset"], "split": s["split"], "path": f"{s['dataset']}/{i}.jpg",
             "label": "malignant" if y[i] else "benign", "prob_malignant": p, "pred": int(p > 0.5)}
            for s in grid.EVAL_SETS.values() for i, p in enumerate(prob)]
    pd.DataFrame(rows).to_csv(run / "evaluation" / "predictions.csv", index=False)
    grid.mark(run, TrainConfig(arch=arch, config=config, out=str(run), seed=seed, epochs=epochs), done=True)
    return name


def test_seed_noise_floor_pairs_each_retrained_model_with_its_grid_twin(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    twin = _finished_run(tmp_path / "grid", "medvit", "original", 0, np.clip(0.3 * y + rng.random(200) * 0.7, 0, 1))
    table = grid.grid_table(_evaluation([(twin, "medvit", "original")]))
    other = np.clip(0.2 * y + rng.random(200) * 0.8, 0, 1)
    _finished_run(tmp_path / "seeds", "medvit", "original", 1, other)
    _finished_run(tmp_path / "seeds", "medvit", "dcgan_aug", 1, other)  # no twin in the grid: skipped
    noise = grid.seed_changes(table, tmp_path / "grid", tmp_path / "seeds", n_boot=200)
    assert list(noise["model"]) == ["medvit_original_s1"] * len(grid.EVAL_SETS)
    assert (noise["twin"] == "medvit_original_s0").all()
    assert np.allclose(noise["auc_change"], noise["auc_other_seed"] - noise["auc_grid_seed"])
    assert (noise["auc_change"] < 0).all() and ((noise["ci_low"] <= noise["auc_change"])
                                                 & (noise["auc_change"] <= noise["ci_high"])).all()
    _finished_run(tmp_path / "seeds", "medvit", "original", 2, other, epochs=5)
    with pytest.raises(grid.GridError, match="more than the training seed"):
        grid.seed_changes(table, tmp_path / "grid", tmp_path / "seeds", n_boot=200)


def test_changes_by_arch_puts_each_change_and_the_noise_floor_in_its_cell():
    def row(config, arch, change, eval_set="ham10000/test"):
        return {"config": config, "arch": arch, "eval_set": eval_set, "auc_change": change, "ci_low": change - 0.01,
                "ci_high": change + 0.01}
    changes = pd.DataFrame([row("ddpm_up", "medvit", 0.01), row("dcgan_aug", "medvit", -0.02),
                            row("dcgan_aug", "mean of 2", -0.015), row("dcgan_aug", "medvit", 0.2, "isic2017/val")])
    seeds = pd.DataFrame([row("original", "medvit", -0.021), row("original", "medvit", -0.029),
                          row("dcgan_aug", "medvit", 0.5)])  # only seed changes on `original` are the floor
    wide = grid.changes_by_arch(changes, seeds).set_index("")
    assert list(wide.columns) == ["dcgan_aug", "ddpm_up", "new seed alone (`original`)"]  # CONFIGS order
    assert list(wide.index) == ["ham10000/test: medvit", "ham10000/test: mean of 2", "isic2017/val: medvit"]
    assert wide.loc["ham10000/test: medvit"].tolist() == [
        "-0.020 (-0.030 to -0.010)", "+0.010 (+0.000 to +0.020)",
        "-0.021 (-0.031 to -0.011), -0.029 (-0.039 to -0.019)"]
    assert wide.loc["ham10000/test: mean of 2"].tolist() == ["-0.015 (-0.025 to -0.005)", "", ""]
    assert "new seed alone (`original`)" not in grid.changes_by_arch(changes).columns


def test_report_on_an_empty_grid_is_a_clear_error(tmp_path):
    report = load_script("08_report")
    with pytest.raises(SystemExit, match="not found: run step 4"):
        report.main(["--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])
    (tmp_path / "runs" / "densenet121_original_s0").mkdir(parents=True)  # started, never finished
    with pytest.raises(SystemExit, match="holds no finished model yet"):
        report.main(["--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])


def test_bootstrap_aucs_match_scikit_learn_on_the_same_resamples():
    from sklearn.metrics import roc_auc_score

    from evaluation.metrics import bootstrap_aucs, bootstrap_indices

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    a, b = np.round(y + rng.normal(0, 1.0, 120), 1), y + rng.normal(0, 1.5, 120)  # rounding makes ties
    expected = [roc_auc_score(y[i], a[i]) for i in bootstrap_indices(y, 200, 3)]
    assert bootstrap_aucs(y, a, 200, 3) == pytest.approx(expected)
    diffs = bootstrap_aucs(y, a, 200, 3) - bootstrap_aucs(y, b, 200, 3)
    _, lo, hi = paired_auc_difference(y, a, b, 200, 3)
    assert np.quantile(diffs, [0.025, 0.975]) == pytest.approx([lo, hi])


def pipeline(work: Path) -> list[str]:
    return [sys.executable, str(SCRIPTS / "run_pipeline.py"), "--preset", "smoke", "--work-dir", str(work),
            "--data-root", str(DATA_ROOT)]


@pytest.mark.real_data
@pytest.mark.slow
def test_smoke_pipeline_survives_a_kill_and_then_skips_every_step(tmp_path):
    work = tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MELANOMA_CACHE": str(tmp_path / "cache")}
    before = repository_outputs()
    command = pipeline(work)

    # 1. Kill the whole run (the pipeline and its step) once step 4 has finished training its first model.
    first = work / "runs" / "classifiers" / "densenet121_original_s0" / "state.pt"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + 900
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the pipeline and the step it runs, as a kill -9 of the job would
        proc.wait()
    assert first.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    stamps = Layout(work).stamps
    assert sorted(p.name for p in stamps.iterdir()) == ["01_prepare_data.json", "02_train_generators.json",
                                                       "03_build_configs.json"]

    # 2. The same command resumes: steps 1-3 skipped, the killed model continued from its state, the rest run.
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for n, name in enumerate(("prepare_data", "train_generators", "build_configs"), 1):
        assert f"[{n}/8 {name}] skipped: up to date" in done.stdout
    assert "== densenet121_original_s0: resume" in done.stdout
    assert "resumed from" in done.stdout
    assert "ran 5 of 8 selected steps" in done.stdout
    check_outputs(work)
    assert repository_outputs() == before  # everything went to --work-dir: no committed result was touched

    # 3. Nothing left to do.
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped: up to date") == 8
    assert "ran 0 of 8 selected steps" in again.stdout


def repository_outputs() -> dict[Path, tuple[int, int]]:
    """Size and mtime of every file in the repository's committed output folders."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for folder in ("results", "checkpoints", "data", "samples")
            for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def check_outputs(work: Path) -> None:
    smoke = PRESETS["smoke"]
    manifest = read_manifest(work / "data" / "manifests" / "original.csv")
    assert len(manifest) == pytest.approx(sum(smoke["subset"].values()), abs=10)
    for config in ("dcgan_aug", "dcgan_up", "ddpm_aug", "ddpm_up"):
        df = read_manifest(work / "data" / "manifests" / f"{config}.csv")
        assert set(df.loc[df["source"] != "real", "split"]) == {"fit"} and (df["source"] != "real").any()

    results = work / "results"
    table = pd.read_csv(results / "models_evaluation" / "grid_metrics.csv")
    archs, configs = smoke["classifier"]["archs"], smoke["classifier"]["configs"]
    models = {grid.run_name(a, c, 0) for a in archs for c in configs}
    assert set(table["model"]) == models | {grid.BASELINE}
    for prefix in grid.EVAL_SETS:
        assert (table[f"{prefix}_n"] == 48).all()
        assert ((table[f"{prefix}_auc_ci_low"] <= table[f"{prefix}_auc"])
                & (table[f"{prefix}_auc"] <= table[f"{prefix}_auc_ci_high"])).all()
        for metric in ("auc", "sensitivity", "specificity"):
            assert table[f"{prefix}_{metric}"].between(0, 1).all()
    assert (table.loc[table["model"] != grid.BASELINE, "threshold_split"] == "val").all()
    assert (table.loc[table["model"] != grid.BASELINE, "train_minutes"] > 0).all()

    report = (results / "models_evaluation" / "grid_report.md").read_text()
    for prefix in grid.EVAL_SETS:
        by_arch = grid.auc_by_arch(table, prefix)
        assert list(by_arch["arch"]) == archs and list(by_arch.columns[1:]) == configs
        assert grid.markdown(by_arch) in report

    assert "## The same changes, architecture x configuration, beside the noise floor" in report
    changes = pd.read_csv(results / "models_evaluation" / "auc_change_vs_original.csv")
    assert len(changes) == len(grid.EVAL_SETS) * (len(archs) + 1)  # per architecture, and their mean
    assert ((changes["ci_low"] <= changes["auc_change"]) & (changes["auc_change"] <= changes["ci_high"])).all()
    assert np.allclose(changes["auc_change"], changes["auc_augmented"] - changes["auc_original"])

    pngs = [results / "models_evaluation" / "grid_auc_heatmap.png", results / "models_evaluation" /
            "auc_change_vs_original.png"]
    pngs += [results / "confusion_matrices" / f"{m}.png" for m in models]
    pngs += [results / "gradcam_outputs" / f"{m}_ham10000_test.png" for m in models]
    for png in pngs:
        with Image.open(png) as image:
            assert image.format == "PNG" and min(image.size) > 100, png

    hybrid = pd.read_csv(results / "hybrid" / "comparison_metrics.csv")
    assert {"classifier", "hybrid_rescue", "classifier_equal_specificity"} <= set(hybrid["Model"])
    vae = json.loads((work / "runs" / "vae" / "best.json").read_text())
    assert vae["anomaly_threshold"] is not None and vae["anomaly_threshold_split"] == "calib"


def test_a_setting_added_after_a_run_was_recorded_counts_as_its_default(tmp_path):
    run = tmp_path / "densenet121_original_s0"
    cfg = TrainConfig(arch="densenet121", epochs=1, out=str(run))
    run.mkdir()
    grid.mark(run, cfg)
    record = json.loads((run / "grid.json").read_text())
    del record["train_config"]["degrade"]  # as grid.json was written before --degrade existed
    (run / "grid.json").write_text(json.dumps(record))
    assert grid.run_status(run, cfg) == "resume"
    with pytest.raises(grid.GridError, match="another configuration \\(degrade: 0.0 vs 0.5\\)"):
        grid.run_status(run, replace(cfg, degrade=0.5))
