"""``usjepa-ingest``: raw ultrasound files -> verified WebDataset shards. See docs/ingest.md.

Exit status: 0 finished cleanly; 3 finished, but some input files were skipped (listed in the manifest's
``skipped`` with a reason); 1 failed (or ``verify`` found problems); 2 bad command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

from usjepa.exit_codes import EXIT_STATUS_HELP, FAILED as EXIT_FAILED, OK as EXIT_OK, SKIPPED as EXIT_SKIPPED
from usjepa.exit_codes import USAGE as EXIT_USAGE

COMMANDS = ("run", "merge", "index", "verify", "contact-sheet")

_EPILOG = EXIT_STATUS_HELP + """
A bare `usjepa-ingest SRC... --out DIR` means `usjepa-ingest run SRC... --out DIR`."""


def parse_size(text: str) -> int:
    """'512MB', '1GiB', '1.5G', '200k', '1048576' -> bytes (K/M/G are powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MB, 1GB)")
    n = float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " ")
    if n < 1:
        raise argparse.ArgumentTypeError("size must be at least 1 byte")
    return int(n)


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build_parser() -> argparse.ArgumentParser:
    from usjepa.ingest.pipeline import DEFAULT_SHARD_SIZE
    from usjepa.ingest.preprocess import PreprocessConfig
    from usjepa.ingest.sources import DEFAULT_EXCLUDE

    pc = PreprocessConfig()
    ap = argparse.ArgumentParser(prog="usjepa-ingest", description="Turn raw ultrasound files into shuffled, "
                                 "dataset-homogeneous WebDataset shards with DALI indexes and a manifest.",
                                 epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="ingest datasets into shards (resumes an interrupted run in the same --out)",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("inputs", nargs="+", metavar="SRC",
                   help="a dataset list (YAML/JSON: name, root, anatomy, kind; optional group_pattern, exclude, labels) "
                        "or a folder (one dataset named after it; a folder holding datasets.yaml is read as that list)")
    r.add_argument("--out", required=True, metavar="DIR", help="output folder for shards and manifest; rerunning the same "
                   "command there resumes an interrupted run")
    r.add_argument("--workers", type=_positive, metavar="N", default=_default_workers(),
                   help="worker processes for decoding/preprocessing and for shard writing "
                        "(default: the CPUs available, here %(default)s)")
    r.add_argument("--part", default=None, metavar="i/N",
                   help="ingest only part i of N (0-based; sources split by a stable hash) for a job array; "
                        "writes manifest.part-i-of-N.json, combined later by `usjepa-ingest merge`")
    r.add_argument("--stride", type=_positive, metavar="K", default=1,
                   help="keep every K-th video/volume frame (frame index divisible by K; default 1 = all). "
                        "Exact duplicates of the previously kept frame are always dropped")
    r.add_argument("--shard-size", type=parse_size, default=DEFAULT_SHARD_SIZE, metavar="SIZE",
                   help="close a shard once it reaches this size, e.g. 512MB, 1GB (default 512MB)")
    r.add_argument("--max-side", type=_positive, metavar="PX", default=pc.max_side,
                   help="resize so the longer side is at most this many pixels (default %(default)s)")
    r.add_argument("--quality", type=int, choices=range(1, 101), metavar="1..100", default=pc.jpeg_quality,
                   help="JPEG quality of the stored frames (default %(default)s)")
    r.add_argument("--seed", type=int, metavar="S", default=0,
                   help="seed of the within-dataset shuffle of samples in the shards (default 0)")
    r.add_argument("--exclude", action="append", metavar="GLOB", default=None,
                   help="leave out files whose name matches GLOB, or folders whose name matches a GLOB ending in "
                        "'/' (repeatable). Default: %s (label masks such as BUSI's 'benign (1)_mask.png', "
                        "'benign (4)_mask_1.png' and DDTI's mask/ folder are annotations, not frames; so are folders "
                        "of binary label images pairing 1:1 with a sibling folder's frames; counted in the manifest); "
                        "--exclude '' excludes nothing"
                        % " ".join(DEFAULT_EXCLUDE))
    r.add_argument("--max-pixels", type=_positive, metavar="N", default=pc.max_pixels,
                   help="pixel budget of a frame, checked from the file's header: larger JPEGs are decoded reduced "
                        "(1/2, 1/4, 1/8); other stills, video frames and volume slices are skipped; never decoded "
                        "whole (default %(default)s)")
    r.add_argument("--quiet", action="store_true", help="no progress bar (the summary line is still printed)")

    m = sub.add_parser("merge", help="combine the manifests of a --part i/N job array into manifest.json")
    m.add_argument("root", help="folder that will hold manifest.json; part manifests are searched below it")
    m.add_argument("parts", nargs="*", help="part manifests to merge (default: every manifest.part-*-of-N.json "
                   "under ROOT)")

    x = sub.add_parser("index", help="(re)build the corpus table (table.npz) of a corpus, e.g. one ingested before "
                       "tables existed; loaders otherwise build it at first open")
    x.add_argument("root", help="corpus folder (holding manifest.json)")
    x.add_argument("--workers", type=_positive, metavar="N", default=_default_workers(),
                   help="processes reading the indexes and metadata (default: the CPUs available, here %(default)s)")

    v = sub.add_parser("verify", help="re-check every shard against the manifest: size, sha256, index, "
                       "sample counts, decodable JPEG/PNG, metadata; exit 1 on any problem")
    v.add_argument("root", help="corpus folder (holding manifest.json)")

    c = sub.add_parser("contact-sheet", help="PNG grid of frames with their USrc mask outlines (green): random, "
                       "worst coverage first, or a diff against an older corpus")
    c.add_argument("root", help="corpus folder (holding manifest.json)")
    c.add_argument("--out", required=True, help="PNG file to write")
    c.add_argument("-n", type=_positive, default=24, help="number of frames (default %(default)s), spread "
                   "evenly over the datasets")
    c.add_argument("--cols", type=_positive, default=6, help="frames per row (default %(default)s)")
    c.add_argument("--cell", type=_positive, default=160, help="tile size in pixels (default %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="which random frames (default %(default)s)")
    c.add_argument("--sort", choices=("random", "coverage"), default="random",
                   help="random (default), or coverage: the frames whose mask covers least of the frame first, "
                        "one per source file (where under-covering masks show)")
    c.add_argument("--diff", metavar="OLD_SHARDS", default=None,
                   help="an older corpus of the same inputs: draw its mask in red beside the new one in green, "
                        "largest disagreement first (review a mask change)")
    return ap


def _run(a) -> int:
    from usjepa.ingest.pipeline import IngestError, IngestOptions, run_ingest, summary_line
    from usjepa.ingest.preprocess import PreprocessConfig
    from usjepa.ingest.sources import DEFAULT_EXCLUDE, datasets_from_args, parse_part

    try:
        part = parse_part(a.part)
        specs = datasets_from_args(a.inputs)
        exclude = DEFAULT_EXCLUDE if a.exclude is None else tuple(g for g in a.exclude if g)
        cfg = dataclasses.replace(PreprocessConfig(), max_side=a.max_side, jpeg_quality=a.quality,
                                  max_pixels=a.max_pixels)
        opts = IngestOptions(out=a.out, workers=a.workers, part=part, stride=a.stride, shard_size=a.shard_size,
                             seed=a.seed, preprocess=cfg, exclude=exclude, progress=not a.quiet)
        manifest = run_ingest(specs, opts)
    except (IngestError, FileNotFoundError, ValueError) as e:
        print(f"usjepa-ingest: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(summary_line(manifest))
    for s in manifest["skipped"]:
        print(f"  skipped {s['dataset']}/{s['path']}: {s['reason']}", file=sys.stderr)
    return EXIT_SKIPPED if manifest["skipped"] else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "run")
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.command is None:
        ap.print_help()
        return EXIT_USAGE
    if a.command == "run":
        return _run(a)
    if a.command == "merge":
        from usjepa.ingest.merge import MergeError, merge_manifests

        try:
            m = merge_manifests(a.root, a.parts or None)
        except (MergeError, OSError, ValueError) as e:
            print(f"usjepa-ingest merge: error: {e}", file=sys.stderr)
            return EXIT_FAILED
        print(f"merged: {m['summary']['frames']} frames in {m['summary']['shards']} shards; "
              f"{m['summary']['skipped_files']} files skipped")
        return EXIT_OK
    if a.command == "index":
        from usjepa.shards.format import ShardFormatError
        from usjepa.shards.readers import build_corpus_table

        try:
            path = build_corpus_table(a.root, workers=a.workers)
        except (ShardFormatError, OSError) as e:
            print(f"usjepa-ingest index: error: {e}", file=sys.stderr)
            return EXIT_FAILED
        print(path)
        return EXIT_OK
    if a.command == "verify":
        from usjepa.ingest.verify import verify_corpus

        problems = verify_corpus(a.root, progress=True)
        for p in problems[:50]:
            print(f"  {p}", file=sys.stderr)
        if problems:
            print(f"verify: FAILED with {len(problems)} problems", file=sys.stderr)
            return EXIT_FAILED
        print("verify: OK")
        return EXIT_OK
    from usjepa.ingest.contact_sheet import make_contact_sheet

    try:
        path = make_contact_sheet(a.root, a.out, n=a.n, cols=a.cols, cell=a.cell, seed=a.seed, sort=a.sort,
                                  diff=a.diff, progress=True)
    except (OSError, ValueError) as e:
        print(f"usjepa-ingest contact-sheet: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(path)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
