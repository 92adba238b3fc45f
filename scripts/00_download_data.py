"""Step 0: download HAM10000 and ISIC 2017 from the ISIC Archive with isic-cli, into the layout the project reads.

    python scripts/00_download_data.py                            # both datasets into ../shared/data (the default)
    python scripts/00_download_data.py --out-root ~/data/melanoma --datasets ham10000
    python scripts/00_download_data.py --convert-only             # lay out an existing export again, no network

Each dataset is fetched by the ISIC Archive's own command-line tool (`isic image download`: images, metadata.csv,
attribution.txt, licences) into <export-dir>/<dataset>/, then hard-linked (copied where links are impossible) into
<out-root>/<dataset>/<split>/<benign|malignant>/ with a labels.csv. Labels, lesion ids and splits come from the
committed data/manifests/original.csv, so the splits are this project's (data/isic_export.py says why).
Re-running is safe: isic-cli skips images it already has (an interrupted download resumes) and the layout step
keeps files that are already in place. Offline, it stops in one line before writing anything.

The archive serves full-resolution images (HAM10000 600x450, ISIC 2017 at their original sizes), while
../shared/data holds downscaled copies (200x150, 256x256): expect numbers close to, not equal to, the README's.
The data's licences travel with it: HAM10000 CC BY-NC-SA 4.0, ISIC 2017 per image (labels.csv's copyright_license
column, licenses/ in each dataset folder). Keep the data out of any repository.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from data.isic_export import (
    COLLECTIONS,
    ArchiveError,
    ExportError,
    check_destination,
    collection_names,
    convert,
    download_command,
)
from data.manifest import ManifestError, read_manifest
from data.paths import MANIFESTS, SHARED_DATA

DEFAULT_ROOT = SHARED_DATA


def collection_ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated collection ids, e.g. 60,71") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-root", type=Path, default=DEFAULT_ROOT,
                   help="data root to write ham10000/ and isic2017/ into (default ../shared/data, where every "
                        "script and the committed manifests look)")
    p.add_argument("--export-dir", type=Path, default=None,
                   help="where isic-cli downloads to, one folder per dataset (default <out-root>/isic-cli); keep it "
                        "to resume and re-run")
    p.add_argument("--datasets", nargs="+", choices=sorted(COLLECTIONS), default=sorted(COLLECTIONS),
                   help="which datasets to fetch")
    for dataset, what in (("ham10000", "HAM10000"), ("isic2017", "ISIC 2017 train and validation")):
        p.add_argument(f"--{dataset}-collections", type=collection_ids, default=COLLECTIONS[dataset], metavar="IDS",
                       help=f"ISIC Archive collection ids of {what}, comma-separated (default "
                            f"{','.join(map(str, COLLECTIONS[dataset]))}; see `isic collection list`)")
    p.add_argument("--reference", type=Path, default=MANIFESTS / "original.csv",
                   help="manifest giving labels, lesion ids and splits (default the committed original.csv)")
    p.add_argument("--convert-only", action="store_true",
                   help="skip the download: lay out what --export-dir already holds (works offline)")
    args = p.parse_args(argv)
    export_root = args.export_dir or args.out_root / "isic-cli"
    collections = {"ham10000": args.ham10000_collections, "isic2017": args.isic2017_collections}
    try:
        reference = read_manifest(args.reference)
        if not args.convert_only:
            for dataset in args.datasets:  # all checked before anything is downloaded
                check_destination(args.out_root, dataset)
                names = collection_names(collections[dataset])
                print(f"{dataset}: " + ", ".join(f"collection {c} '{n}'" for c, n in names.items()))
        for dataset in args.datasets:
            export = export_root / dataset
            if not args.convert_only:
                command = download_command(collections[dataset], export, sys.executable)
                code = subprocess.run(command, stdin=subprocess.DEVNULL).returncode
                if code:
                    raise ArchiveError(f"isic-cli stopped (exit {code}) while downloading {dataset}; run the same "
                                       "command again to resume")
            s = convert(export, reference, dataset, args.out_root,
                        {"collections": list(collections[dataset])}, progress=True)
            print(f"{dataset}: {s['images']} images in {args.out_root / dataset} ({s['linked']} linked, "
                  f"{s['copied']} copied, {s['kept']} already there; {s['ignored']} export images not in the "
                  "reference, left out)")
            if s["melanoma_disagreements"]:
                print(f"warning: {len(s['melanoma_disagreements'])} {dataset} images are melanoma in the archive's "
                      "metadata but not in the reference, or the other way round (e.g. "
                      f"{s['melanoma_disagreements'][0]}); labels.csv follows the reference")
    except (ArchiveError, ExportError, ManifestError, OSError) as exc:
        sys.exit(f"error: {exc}")
    if args.out_root.resolve() != DEFAULT_ROOT.resolve():  # the committed manifests already point at the default
        print(f"next: python scripts/01_prepare_data.py --data-root {args.out_root}")


if __name__ == "__main__":
    main()
