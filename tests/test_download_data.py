"""scripts/00_download_data.py and data/isic_export.py: isic-cli exports -> the project's data layout.

The export is written by isic-cli's own `isic image download` (its real code, in-process), talking to a stand-in for
the ISIC Archive API that serves a dozen HAM10000 and ISIC 2017 images from ../shared/data; so the layout step is
tested on exactly the files isic-cli writes. Laying it out again must give back the shipped labels.csv rows and
bytes. The offline path is run as a subprocess that cannot reach the archive (a dead proxy).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import requests

from data.isic_export import (
    DX_TYPE,
    MARKER,
    MELANOMA_CLASS,
    ExportError,
    convert,
    read_export,
    reference_labels,
)
from data.manifest import read_ham10000, read_isic2017, read_manifest
from data.paths import MANIFESTS, SAMPLES, SCRIPTS, SHARED_DATA
from data.prepare import build_manifest

DATA = SHARED_DATA
SCRIPT = SCRIPTS / "00_download_data.py"
REFERENCE = MANIFESTS / "original.csv"
# A terminal value of the archive's diagnosis hierarchy (isic-metadata) for each label the test images carry.
ARCHIVE_DIAGNOSIS = {"mel": "Melanoma Invasive", "nv": "Nevus", "bkl": "Pigmented benign keratosis",
                     "bcc": "Basal cell carcinoma", "akiec": "Solar or actinic keratosis", "df": "Dermatofibroma",
                     "vasc": "Hemangioma", "melanoma": "Melanoma Invasive", "nevus": "Nevus",
                     "seborrheic_keratosis": "Seborrheic keratosis"}
# How the archive states each HAM10000 dx_type (isic-metadata's DiagnosisConfirmTypeEnum member names).
CONFIRM_TYPE = {"histo": "histopathology", "follow_up": "serial_imaging_showing_no_change",
                "consensus": "single_image_expert_consensus",
                "confocal": "confocal_microscopy_with_consensus_dermoscopy"}


def test_constants_are_isic_metadata_vocabulary():
    from isic_metadata.diagnosis_hierarchical import DiagnosisEnum
    from isic_metadata.fields import DiagnosisConfirmTypeEnum

    assert set(DX_TYPE) <= {e.value for e in DiagnosisConfirmTypeEnum}
    for terminal in ("Melanoma Invasive", "Melanoma in situ", "Melanoma, NOS"):
        assert DiagnosisEnum.levels(DiagnosisEnum.accept_terminal_values(terminal))[1] == MELANOMA_CLASS
    for terminal in ("Nevus", "Seborrheic keratosis", "Basal cell carcinoma"):
        assert DiagnosisEnum.levels(DiagnosisEnum.accept_terminal_values(terminal))[1] != MELANOMA_CLASS


def test_reference_order_reproduces_the_committed_splits(tmp_path: Path):
    """labels.csv from the reference -> 01_prepare_data draws the committed fit/val/calib split (the same lesion ids,
    diagnoses and seed), with no images needed."""
    committed = read_manifest(REFERENCE)
    labels = reference_labels(committed, "ham10000")
    labels["path"] = [f"{s}/{lab}/{i}.jpg" for s, lab, i in zip(labels["split"], labels["label"], labels["image_id"])]
    (tmp_path / "ham10000").mkdir()
    labels.to_csv(tmp_path / "ham10000" / "labels.csv", index=False)
    rebuilt = build_manifest(tmp_path).set_index("image_id")["split"]
    ham = committed[committed["dataset"] == "ham10000"].set_index("image_id")["split"]
    assert len(rebuilt) == len(ham) == 10015
    assert rebuilt.loc[ham.index].equals(ham)


def archive_images(rows: pd.DataFrame, dataset: str) -> list[dict]:
    """Image records as the archive's images/search/ endpoint returns them (the keys isic-cli reads)."""
    from isic_metadata.diagnosis_hierarchical import DiagnosisEnum
    from isic_metadata.fields import DiagnosisConfirmTypeEnum

    records = []
    for r in rows.itertuples():
        label = r.dx if dataset == "ham10000" else r.diagnosis
        levels = DiagnosisEnum.levels(DiagnosisEnum.accept_terminal_values(ARCHIVE_DIAGNOSIS[label]))
        clinical = {f"diagnosis_{k + 1}": v for k, v in enumerate(levels) if v}
        clinical["sex"] = r.sex
        if dataset == "ham10000":
            clinical["diagnosis_confirm_type"] = DiagnosisConfirmTypeEnum[CONFIRM_TYPE[r.dx_type]].value
        path = DATA / dataset / r.path
        records.append({"isic_id": r.image_id, "copyright_license": "CC-BY-NC",
                        "attribution": "Test Contributor" if dataset == "ham10000" else "Another Contributor",
                        "metadata": {"acquisition": {"image_type": "dermoscopic"}, "clinical": clinical},
                        "files": {"full": {"url": f"https://content.example/{path.stem}.jpg?signed=1",
                                           "size": path.stat().st_size, "local": str(path)}}})
    return records


def fake_archive(records: list[dict]):
    """IsicCliSession.request for a stand-in archive serving `records`."""
    by_url = {r["files"]["full"]["url"]: Path(r["files"]["full"]["local"]) for r in records}

    def request(self, method: str, url: str, **kwargs) -> requests.Response:
        response = requests.Response()
        response.status_code, response.encoding, response._content_consumed = 200, "utf-8", True
        if url in by_url:
            response._content = by_url[url].read_bytes()
            return response
        if url.startswith("collections/"):
            body = {"id": int(url.split("/")[1]), "name": "stand-in"}
        elif url.startswith("images/search/size/"):
            body = {"size": sum(r["files"]["full"]["size"] for r in records)}
        elif url.startswith("images/search/"):
            body = {"count": len(records), "results": records, "next": None}
        elif url.startswith("zip-download/license-file/"):
            response._content = f"licence text of {url.split('/')[2]}\n".encode()
            return response
        else:
            raise AssertionError(f"unexpected request {method} {url}")
        response._content = json.dumps(body).encode()
        return response

    return request


def isic_cli_export(rows: pd.DataFrame, dataset: str, out: Path) -> None:
    """Run isic-cli's `image download` against the stand-in archive."""
    from click.testing import CliRunner
    from isic_cli import cli as isic_cli
    from isic_cli.session import IsicCliSession

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(isic_cli, "_sentry_setup", lambda: None)  # no error reporting from a test
        mp.setattr(IsicCliSession, "request", fake_archive(archive_images(rows, dataset)))
        mp.setattr(signal, "signal", lambda *a: None)  # keep pytest's own SIGINT handling
        result = CliRunner().invoke(isic_cli.cli, ["--guest", "--no-version-check", "image", "download",
                                                   "--collections", "212", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per dataset: a few images of every diagnosis and split, the reference rows for them (in the committed
    manifest's order), and an isic-cli export of those images plus one the reference does not list."""
    if not (DATA / "ham10000" / "labels.csv").is_file():
        pytest.skip(f"real datasets not found at {DATA}")
    committed = pd.read_csv(REFERENCE, dtype={"lesion_id": str, "sex": str, "site": str, "dx": str})
    out = {"root": tmp_path_factory.mktemp("isic-cli")}
    for dataset, key in (("ham10000", "dx"), ("isic2017", "diagnosis")):
        shipped = pd.read_csv(DATA / dataset / "labels.csv", dtype=str, keep_default_na=False)
        chosen = shipped.groupby(["split", key], group_keys=False).head(1)
        extra = shipped[~shipped["image_id"].isin(chosen["image_id"])].head(1)
        isic_cli_export(pd.concat([chosen, extra]), dataset, out["root"] / dataset)
        out[dataset] = {"shipped": chosen.set_index("image_id"),
                        "reference": committed[committed["image_id"].isin(chosen["image_id"])]}
    return out


@pytest.mark.real_data
def test_export_is_what_isic_cli_writes(exports: dict):
    export = exports["root"] / "ham10000"
    header = (export / "metadata.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["isic_id", "attribution", "copyright_license"]
    assert header[3:] == sorted(header[3:]) and "diagnosis_2" in header
    assert (export / "attribution.txt").read_text() == "Test Contributor"
    assert (export / "licenses" / "CC-BY-NC.txt").is_file()
    meta = read_export(export)
    assert len(meta) == len(exports["ham10000"]["shipped"]) + 1
    assert all(f.name == f"{i}.jpg" for i, f in zip(meta.index, meta["file"]))


@pytest.mark.real_data
@pytest.mark.parametrize("dataset", ["ham10000", "isic2017"])
def test_layout_gives_back_the_shipped_labels(exports: dict, dataset: str, tmp_path: Path):
    part = exports[dataset]
    summary = convert(exports["root"] / dataset, part["reference"], dataset, tmp_path, {"collections": [212]})
    n = len(part["shipped"])
    assert (summary["images"], summary["linked"] + summary["copied"], summary["kept"]) == (n, n, 0)
    assert summary["ignored"] == 1 and summary["melanoma_disagreements"] == []
    labels = pd.read_csv(tmp_path / dataset / "labels.csv", dtype=str, keep_default_na=False).set_index("image_id")
    shipped = part["shipped"].loc[labels.index]  # labels.csv follows the reference's row order
    assert list(labels.index) == list(part["reference"]["image_id"])
    pd.testing.assert_frame_equal(labels[shipped.columns], shipped)  # every shipped column, md5 and path included
    assert set(labels["copyright_license"]) == {"CC-BY-NC"}
    assert all((tmp_path / dataset / rel).is_file() for rel in labels["path"])
    assert (tmp_path / dataset / "licenses" / "CC-BY-NC.txt").is_file()
    assert json.loads((tmp_path / dataset / MARKER).read_text())["collections"] == [212]
    read = read_ham10000 if dataset == "ham10000" else read_isic2017  # the project's own readers take it
    assert read(tmp_path / dataset)["path"].map(os.path.isfile).all()


@pytest.mark.real_data
def test_layout_is_idempotent_and_guarded(exports: dict, tmp_path: Path):
    part, export = exports["ham10000"], exports["root"] / "ham10000"
    convert(export, part["reference"], "ham10000", tmp_path)
    before = (tmp_path / "ham10000" / "labels.csv").read_bytes()
    again = convert(export, part["reference"], "ham10000", tmp_path)
    assert again["kept"] == again["images"] and (again["linked"], again["copied"]) == (0, 0)
    assert (tmp_path / "ham10000" / "labels.csv").read_bytes() == before
    (tmp_path / "ham10000" / MARKER).unlink()  # now it looks like a dataset someone else put there
    with pytest.raises(FileExistsError, match="did not write"):
        convert(export, part["reference"], "ham10000", tmp_path)


@pytest.mark.real_data
def test_incomplete_exports_and_relabelled_images_are_reported(exports: dict, tmp_path: Path):
    part, export = exports["ham10000"], exports["root"] / "ham10000"
    committed = pd.read_csv(REFERENCE)
    lacking = committed[committed["dataset"].eq("ham10000") & ~committed["image_id"].isin(read_export(export).index)]
    with pytest.raises(ExportError, match="1 of the"):
        convert(export, pd.concat([part["reference"], lacking.head(1)]), "ham10000", tmp_path / "a")
    copy = tmp_path / "export"
    copy.mkdir()
    for f in export.iterdir():
        if f.is_file():
            os.link(f, copy / f.name)
    meta = pd.read_csv(copy / "metadata.csv", dtype=str, keep_default_na=False)
    melanoma = part["shipped"].index[part["shipped"]["dx"] == "mel"][0]
    meta.loc[meta["isic_id"] == melanoma, "diagnosis_2"] = "Benign melanocytic proliferations"
    (copy / "metadata.csv").unlink()
    meta.to_csv(copy / "metadata.csv", index=False)
    assert convert(copy, part["reference"], "ham10000", tmp_path / "b")["melanoma_disagreements"] == [melanoma]
    (copy / f"{melanoma}.jpg").unlink()
    with pytest.raises(ExportError, match="not there"):
        read_export(copy)
    (copy / "metadata.csv").unlink()  # isic-cli writes it last: an unfinished download
    with pytest.raises(FileNotFoundError, match="did not finish"):
        read_export(copy)


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.real_data
def test_script_lays_out_an_existing_export_offline(exports: dict, tmp_path: Path):
    reference = tmp_path / "reference.csv"
    pd.concat([exports[d]["reference"] for d in ("ham10000", "isic2017")]).to_csv(reference, index=False)
    done = run_script("--convert-only", "--export-dir", str(exports["root"]), "--out-root", str(tmp_path / "data"),
                      "--reference", str(reference))
    assert done.returncode == 0, done.stderr
    assert f"ham10000: {len(exports['ham10000']['shipped'])} images" in done.stdout
    assert "next: python scripts/01_prepare_data.py" in done.stdout
    assert (tmp_path / "data" / "isic2017" / "labels.csv").is_file()


def test_offline_is_one_clear_line(tmp_path: Path):
    dead_proxy = "http://127.0.0.1:9"  # nothing listens there: every request fails to connect
    done = run_script("--out-root", str(tmp_path / "data"),
                      env={"HTTPS_PROXY": dead_proxy, "https_proxy": dead_proxy, "NO_PROXY": "", "no_proxy": ""})
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: cannot reach the ISIC Archive")
    assert not (tmp_path / "data").exists()  # stopped before writing anything


def test_a_dataset_not_written_by_the_script_stops_it_before_any_download(tmp_path: Path):
    (tmp_path / "ham10000").mkdir()
    (tmp_path / "ham10000" / "labels.csv").write_text("image_id\n")  # e.g. ../shared/data as shipped
    done = run_script("--out-root", str(tmp_path), "--datasets", "ham10000")
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "did not write" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ham10000"]  # no isic-cli export folder made


def test_bundled_samples_are_labelled_ham10000_test_images():
    """samples/: at most 8 HAM10000 `test` images of both classes, each named and listed with its true diagnosis
    (checked against the committed manifest), its bytes (md5) and its licence beside it."""
    samples = SAMPLES
    labels = pd.read_csv(samples / "labels.csv")
    assert len(labels) <= 8 and set(labels["label"]) == {"benign", "malignant"}
    assert sorted(labels["file"]) == sorted(f"images/{p.name}" for p in (samples / "images").iterdir())
    truth = pd.read_csv(REFERENCE).set_index("image_id").loc[labels["image_id"]]
    assert (truth["split"] == "test").all() and (labels["source"] == "HAM10000").all()
    assert list(truth["dx"]) == list(labels["dx"]) and list(truth["label"]) == list(labels["label"])
    for row in labels.itertuples():
        assert Path(row.file).name == f"ham10000_{row.label}_{row.dx}_{row.image_id}.jpg"
        assert hashlib.md5((samples / row.file).read_bytes()).hexdigest() == row.md5
    assert set(labels["licence"]) == {"CC BY-NC-SA 4.0"}
    assert "CC BY-NC-SA 4.0" in (samples / "ATTRIBUTION.md").read_text()
