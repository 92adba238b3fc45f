"""Fetch the shipped weights from a Hugging Face Hub repository and verify them against checkpoints/SHA256SUMS.

    python scripts/download_weights.py                                  # default repository, into checkpoints/
    python scripts/download_weights.py --repo-id you/your-melanoma-weights --out /tmp/weights

The same files are committed in checkpoints/ of this repository; this script is for installs that skip them (or
mirrors). Every file is checked by sha256 before it is moved into place; a mismatch is an error and nothing is
overwritten. Without network access it says so in one line and points to checkpoints/. CPU, GPU or cluster: same.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from data.manifest import file_sha256
from data.paths import CHECKPOINTS
from data.runtime import UserError, cli_main

DEFAULT_REPO = "melanoma-toolkit/densenet121-convvae"


def read_sums(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise UserError(f"{path} not found: it lists the expected sha256 of every shipped file")
    return {name: digest for digest, name in (line.split() for line in path.read_text().splitlines() if line.strip())}


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--repo-id",
        default=os.environ.get("MELANOMA_WEIGHTS_REPO", DEFAULT_REPO),
        help="Hugging Face Hub model repository (env MELANOMA_WEIGHTS_REPO)",
    )
    p.add_argument("--revision", default="main", help="branch, tag or commit of that repository")
    p.add_argument("--sums", default=str(CHECKPOINTS / "SHA256SUMS"), help="expected sha256 per file")
    p.add_argument("--out", default=str(CHECKPOINTS), help="where verified files go")
    p.add_argument("--timeout", type=int, default=10, help="seconds to wait for the Hub before giving up")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(a.timeout)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(a.timeout)))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # our one-line message replaces the library's retry chatter

    expected = read_sums(Path(a.sums))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, digest in expected.items():
        try:
            local = Path(hf_hub_download(a.repo_id, name, revision=a.revision))
        except Exception as exc:  # offline, unknown repository, missing file: one line, no traceback
            sys.exit(
                f"error: cannot fetch {name} from the Hugging Face Hub repository {a.repo_id} "
                f"({exc.__class__.__name__}); the shipped weights are already in {CHECKPOINTS}"
            )
        actual = file_sha256(local)
        if actual != digest:
            sys.exit(
                f"error: {name} from {a.repo_id} has sha256 {actual[:16]}..., expected {digest[:16]}...; not installed"
            )
        tmp = out / f"{name}.tmp"
        shutil.copyfile(local, tmp)
        os.replace(tmp, out / name)
        print(f"verified {name} ({digest[:12]})")


if __name__ == "__main__":
    main()
