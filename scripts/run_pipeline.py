"""Run the numbered pipeline (steps 01..08) with one preset; skip the steps that are up to date; resume after a kill.

    # CPU, the smoke preset: a small real subset end to end in a few minutes (everything under runs/smoke/)
    OMP_NUM_THREADS=1 python scripts/run_pipeline.py --preset smoke
    # CPU (2 cores), the reported run, into the repository (data/manifests, runs/, checkpoints/, results/)
    python scripts/run_pipeline.py --preset cpu
    python scripts/run_pipeline.py --preset cpu --only 8                 # rebuild the report
    python scripts/run_pipeline.py --preset cpu --from-step 4 --dry-run  # what would run, and why
    # one GPU
    python scripts/run_pipeline.py --preset full --device cuda
    # several GPUs: split step 4 over them (see scripts/04_train_classifiers.py), then --from-step 4 again here

Steps: 1 prepare_data, 2 train_generators, 3 build_configs, 4 train_classifiers, 5 train_vae, 6 calibrate,
7 evaluate_hybrid, 8 report; each is a scripts/0N_*.py run as a subprocess (the list of commands is in
studies/presets.py; --dry-run prints them). After a step succeeds, a stamp <work-dir>/runs/pipeline/NN_<name>.json
records the step's key: the sha256 of its commands and of the content of its input files. A step is skipped when
its stamp's key is unchanged and all its declared outputs exist; changing an input (say, a manifest) or a budget
re-runs it and the steps that read its outputs. A killed run is resumed by running the same command again: finished
steps are skipped, and the long steps continue where they stopped (generators, classifiers and the VAE resume from
their last epoch; the grid skips finished models). Use one --work-dir per preset. --device is passed to every step
that takes one; --threads becomes every step's OMP_NUM_THREADS (default: inherited).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from data.atomic import atomic_write_text
from data.manifest import file_sha256
from data.paths import ROOT, RUNS, SHARED_DATA
from data.runtime import UserError, add_runtime_options, cli_main
from studies.presets import PRESETS, Layout, Step, describe, steps


def action_text(action) -> str:
    """A command as text (argv joined, or the Python call with its arguments): part of the step's key."""
    if isinstance(action, list):
        return " ".join(action)
    return f"{action.func.__module__}.{action.func.__name__}{action.args}{sorted(action.keywords.items())}"


def step_key(step: Step) -> str:
    inputs = {str(p): file_sha256(p) if p.is_file() else None for p in step.inputs}
    text = json.dumps({"actions": [action_text(a) for a in step.actions], "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def stamp_path(layout: Layout, step: Step) -> Path:
    return layout.stamps / f"{step.number:02d}_{step.name}.json"


def up_to_date(layout: Layout, step: Step) -> tuple[bool, str]:
    """(skip?, why)."""
    path = stamp_path(layout, step)
    if not path.is_file():
        return False, "never finished"
    if json.loads(path.read_text())["key"] != step_key(step):
        return False, "its commands or inputs changed"
    missing = [p for p in step.outputs if not p.exists()]
    if missing:
        return False, f"{missing[0]} is missing"
    return True, f"up to date ({path.name})"


def write_stamp(layout: Layout, step: Step, seconds: float) -> None:
    """After the step: its key is computed now, so a step that updates one of its inputs (step 6 writes the
    threshold into the VAE sidecar) is up to date with the updated file."""
    atomic_write_text(stamp_path(layout, step), json.dumps(
        {"step": step.number, "name": step.name, "key": step_key(step), "seconds": round(seconds, 1),
         "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
         "outputs": [str(o) for o in step.outputs]}, indent=2) + "\n")


class StepError(UserError):
    """A step's command failed or did not write its outputs."""


def run_step(step: Step, device: str, env: dict[str, str]) -> None:
    for action in step.actions:
        if not isinstance(action, list):
            action()
            continue
        command = [sys.executable, *action, *(["--device", device] if step.device else [])]
        print("$ " + " ".join(command), flush=True)
        code = subprocess.run(command, cwd=ROOT, env=env).returncode
        if code != 0:
            raise StepError(f"step {step.number} ({step.name}) failed with exit code {code}; fix it and run the "
                            f"same command again to resume")
    missing = [p for p in step.outputs if not p.exists()]
    if missing:
        raise StepError(f"step {step.number} ({step.name}) finished without writing {missing[0]}")


@cli_main
def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, epilog="presets and their budgets (studies/presets.py):\n"
                                + describe(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=list(PRESETS), help="budget of every step (see below)")
    p.add_argument("--work-dir", default=None,
                   help="root of every output (default: runs/smoke for the smoke preset, else the repository)")
    p.add_argument("--data-root", default=str(SHARED_DATA),
                   help="folder holding ham10000/ and isic2017/")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--from-step", type=int, default=1, choices=range(1, 9), metavar="N",
                      help="start at step N (earlier steps are neither run nor checked)")
    what.add_argument("--only", type=int, nargs="+", choices=range(1, 9), metavar="N", help="run only these steps")
    p.add_argument("--force", action="store_true", help="run the selected steps even when they are up to date")
    p.add_argument("--dry-run", action="store_true", help="print each selected step's status and commands; run nothing")
    add_runtime_options(p, seed=0)
    a = p.parse_args(argv)
    work = Path(a.work_dir or (RUNS / "smoke" if a.preset == "smoke" else ROOT))
    layout = Layout(work)
    env = dict(os.environ)
    env.setdefault("MELANOMA_CACHE", str(layout.work / ".cache"))
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    selected = [s for s in steps(a.preset, layout.work, a.data_root, a.seed)
                if (s.number in a.only if a.only else s.number >= a.from_step)]
    ran, t_all = [], time.perf_counter()
    for step in selected:
        skip, why = up_to_date(layout, step)
        verb = "would run" if a.dry_run else "running"
        print(f"[{step.number}/8 {step.name}] " + ("skipped: " + why if skip and not a.force else
                                                  verb + (" (--force)" if skip else f": {why}")), flush=True)
        if a.dry_run:
            print("\n".join("    " + action_text(x) for x in step.actions))
            continue
        if skip and not a.force:
            continue
        t0 = time.perf_counter()
        run_step(step, a.device, env)
        seconds = time.perf_counter() - t0
        write_stamp(layout, step, seconds)
        print(f"[{step.number}/8 {step.name}] done in {seconds:.0f} s", flush=True)
        ran.append(step.name)
    print(f"pipeline ({a.preset}) in {layout.work}: ran {len(ran)} of {len(selected)} selected steps "
          f"in {time.perf_counter() - t_all:.0f} s")
    return ran


if __name__ == "__main__":
    main()
