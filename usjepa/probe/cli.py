"""``usjepa-probe``: the paper's evaluation protocol on any frozen encoder.

    usjepa-probe --data ../shared/realdata/busi --encoder random=random:vit_base_patch16_224 \\
        --encoder student=runs/demo/encoder.safetensors --fewshot --robustness --out runs/probe

Exit status 3 means the run finished but some files or frames were skipped (unreadable, all black); the
report lists each with its reason.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from usjepa.exit_codes import EXIT_STATUS_HELP, FAILED, OK, SKIPPED, USAGE
from usjepa.probe.data import DEFAULT_EXCLUDE, DEFAULT_FRACTIONS, DEFAULT_FRAMES_PER_VIDEO, LabelledDataError
from usjepa.probe.encoders import EncoderSpecError
from usjepa.probe.features import PRECISIONS
from usjepa.probe.linear import ProbeConfig, ProbeSettingsError
from usjepa.probe.run import CORRUPTIONS, FEWSHOT_FRACTIONS, SEVERITIES, SPLIT_DRAWS, probe_encoders
from usjepa.shards.format import ShardFormatError


def _default_name(value: str) -> str:
    if value.startswith("random:"):
        return "random-init " + value.split(":", 1)[1]
    if value.startswith("timm:"):
        return value.split(":")[1]
    path, _, key = value.partition("#")
    return Path(path).stem + (f"#{key}" if key else "")


def _named(values: list[str], what: str) -> dict[str, str]:
    """``NAME=VALUE`` or a bare ``VALUE`` (named after itself) -> ordered {name: value}."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, val = v.partition("=")
        if not sep or not name or "/" in name or ":" in name:
            name, val = _default_name(v), v
        if name in out:
            raise UsageError(f"two {what}s are named {name!r}; name them with NAME=...")
        out[name] = val
    return out


class UsageError(ValueError):
    """A command line that cannot run as written."""


def _per_dataset(values: list[str] | None, datasets: dict[str, str]) -> dict[str, str]:
    """``[NAME=]REGEX`` options -> {dataset: regex}; a bare REGEX applies to every dataset. ``NAME=`` is only
    read as a prefix when NAME is one of the datasets (a regex may hold '=' itself)."""
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, rx = v.partition("=")
        if sep and name in datasets:
            out[name] = rx
        else:
            out.update({d: v for d in datasets if d not in out})
    return out


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = ProbeConfig()
    p = argparse.ArgumentParser(prog="usjepa-probe", description=__doc__.split("\n\n")[0],
                                epilog=EXIT_STATUS_HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", action="append", required=True, metavar="[NAME=]PATH",
                   help="labelled data: class folders (stills, videos, volumes), a CSV "
                        "(path,label[,split][,group][,frame]), labelled shards of usjepa-ingest (manifest.json), "
                        "or UltraBench's processed layout; repeat for several datasets (table columns)")
    p.add_argument("--encoder", action="append", required=True, metavar="[NAME=]SPEC",
                   help="checkpoint / URFM / timm-keyed file (PATH or PATH#KEY), random:ARCH, or timm:MODEL:PATH; "
                        "repeat for several encoders (table rows)")
    p.add_argument("--out", required=True, help="output folder (JSON, markdown, PNGs, feature cache)")
    p.add_argument("--seeds", type=int, default=5, help="probe seeds 0..N-1")
    p.add_argument("--fewshot", action="store_true", help="also train on stratified fractions of the labels")
    p.add_argument("--fewshot-fractions", type=_floats, default=list(FEWSHOT_FRACTIONS), metavar="F,F,...",
                   help="fractions of the training labels (1.0 = the full probe)")
    p.add_argument("--robustness", action="store_true", help="also score on corrupted test sets")
    p.add_argument("--severities", type=_floats, default=list(SEVERITIES), metavar="E,E,...",
                   help="corruption severities ε for blur, contrast and speckle")
    p.add_argument("--classifier", choices=("linear", "logreg", "both"), default="both",
                   help="our Table 6 linear probe, scikit-learn's logistic regression (the reference), or both")
    p.add_argument("--no-normalise", action="store_true",
                   help="feed raw features to the classifiers (default: z-score with the training split's stats)")
    p.add_argument("--label-pattern", action="append", metavar="[NAME=]REGEX",
                   help="labels from file names: first capture group (or the match) of REGEX searched in each "
                        "file name under PATH, e.g. '^(Cov|Pneu|Reg)'; non-matching files are left out. "
                        "NAME= limits it to one --data")
    p.add_argument("--frames-per-video", type=int, default=DEFAULT_FRAMES_PER_VIDEO, metavar="K",
                   help="evenly spaced frames taken from each video or volume (and labelled shard source)")
    p.add_argument("--arch", default=None, help="architecture for weights files that do not record one")
    p.add_argument("--pooling", choices=("mean", "cls"), default="mean",
                   help="mean of the patch tokens after the final norm, or the CLS token")
    p.add_argument("--split", type=_floats, default=list(DEFAULT_FRACTIONS), metavar="TRAIN,VAL,TEST",
                   help="fractions for splits the data does not carry (made by group, stratified)")
    p.add_argument("--split-seed", type=int, default=0, metavar="K",
                   help="the first of the made splits' draws (0: the default split)")
    p.add_argument("--split-draws", type=int, default=SPLIT_DRAWS, metavar="N",
                   help="grouped split draws every score is repeated over (features reused): cells are mean ± "
                        "std over draws, encoders are compared pairwise on the same draws")
    p.add_argument("--group-pattern", action="append", metavar="[NAME=]REGEX",
                   help="patient id from the relative path: first capture group (or the whole match); frames of "
                        "one file are always grouped, this groups files (videos of one patient) too. "
                        "NAME= limits it to one --data")
    p.add_argument("--exclude", default=DEFAULT_EXCLUDE, metavar="REGEX",
                   help="class folders and --label-pattern: skip files whose stem matches (lesion masks); '' keeps all")
    p.add_argument("--max-epochs", type=int, default=d.max_epochs, help="probe epochs at most (Table 6)")
    p.add_argument("--patience", type=int, default=d.patience, help="early-stopping patience on val loss")
    p.add_argument("--min-epochs", type=int, default=d.min_epochs,
                   help="no probe epoch before this one is kept (a tiny val set cannot stop the probe at once)")
    p.add_argument("--probe-lr", type=_floats, default=list(d.lr_grid), metavar="LR,LR,...",
                   help="linear probe Adam lr grid; each seed keeps the lr × wd best on validation macro F1")
    p.add_argument("--probe-c", type=_floats, default=list(d.c_grid), metavar="C,C,...",
                   help="linear probe L2 penalty grid as logistic regression's C: λ = 1 / (C N) on the mean loss "
                        "(2 / (C N) with two classes); the default is logreg's own grid")
    p.add_argument("--probe-wd", type=_floats, default=None, metavar="WD,WD,...",
                   help="linear probe L2 penalty grid as λ values directly, instead of --probe-c")
    p.add_argument("--polish-iters", type=int, default=d.polish_iters,
                   help="L-BFGS steps at most that take each probe from its Adam weights to the optimum; 0: off")
    p.add_argument("--cache-dir", default=None, help="feature cache; None means OUT/feature_cache")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder forward pass")
    p.add_argument("--workers", type=int, default=None,
                   help="decode/preprocess threads beside the encoder; None: half the cores, at least 2")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="encoder arithmetic: auto = bf16 on CUDA and on CPUs with native bf16 (AVX-512 BF16/AMX), "
                        "else fp32")
    p.add_argument("--device", default=None, help="cuda / cpu; None: cuda when available")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG curves")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    return p


def _log_to_stderr(level: int) -> None:
    """This run logs to the stderr it has now. An earlier in-process caller may have left handlers on a stream
    that is gone (``usjepa.train`` points the ``usjepa`` logger at its stdout and stops propagation): a
    warning would then print a logging traceback instead of one line."""
    logging.basicConfig(level=level, format="%(levelname)s %(message)s", force=True)
    pkg = logging.getLogger("usjepa")
    for h in list(pkg.handlers):
        pkg.removeHandler(h)
    pkg.setLevel(logging.NOTSET)
    pkg.propagate = True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_stderr(logging.WARNING if args.quiet else logging.INFO)
    try:
        data = _named(args.data, "dataset")
        res = probe_encoders(
            _named(args.encoder, "encoder"), data, args.out, seeds=args.seeds,
            fewshot=args.fewshot, robustness=args.robustness, arch=args.arch, pooling=args.pooling,
            classifier=args.classifier, normalise=not args.no_normalise,
            split_fractions=tuple(args.split), split_seed=args.split_seed, split_draws=args.split_draws,
            group_pattern=_per_dataset(args.group_pattern, data),
            label_pattern=_per_dataset(args.label_pattern, data), frames_per_video=args.frames_per_video,
            exclude=args.exclude or None, fewshot_fractions=tuple(args.fewshot_fractions),
            corruptions=CORRUPTIONS, severities=tuple(args.severities),
            probe=ProbeConfig(max_epochs=args.max_epochs, patience=args.patience, min_epochs=args.min_epochs,
                              lr_grid=tuple(args.probe_lr), c_grid=tuple(args.probe_c),
                              wd_grid=tuple(args.probe_wd) if args.probe_wd else None,
                              polish_iters=args.polish_iters), cache_dir=args.cache_dir,
            batch_size=args.batch_size, workers=args.workers, precision=args.precision, device=args.device,
            plots=not args.no_plots, progress=not args.quiet)
    except (UsageError, LabelledDataError, ProbeSettingsError, EncoderSpecError, ShardFormatError, FileNotFoundError,
            NotADirectoryError, PermissionError) as e:
        print(f"usjepa-probe: error: {e}", file=sys.stderr)
        return USAGE
    except FloatingPointError as e:  # an encoder that yields NaN/inf features: the run failed, say why
        print(f"usjepa-probe: failed: {e}", file=sys.stderr)
        return FAILED
    print(Path(res["files"]["markdown"]).read_text())
    print(f"wrote {res['files']['json']}, {res['files']['markdown']}"
          + "".join(f", {p}" for p in res["files"]["plots"]))
    if res["skipped_frames"]:
        print(f"usjepa-probe: {res['skipped_frames']} file(s)/frame(s) skipped; listed with reasons in "
              f"{res['files']['markdown']}", file=sys.stderr)
        return SKIPPED
    return OK


if __name__ == "__main__":
    sys.exit(main())
