"""Draw docs/img/corruptions.png: blur, contrast and speckle at ε = 1, 2, 3 on a real frame.

    python -m usjepa.shards.corruptions_figure [--frame PATH] [--out docs/img/corruptions.png]

Without ``--frame`` it takes the first BUSI image under ../shared/realdata (or $USJEPA_REALDATA) and exits
cleanly with a message when that folder is absent.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import cv2

from usjepa.shards.corruptions import KINDS, SEVERITIES, contrast_alpha, blur_params, corrupt, speckle_params


def default_frame() -> Path | None:
    root = Path(os.environ.get("USJEPA_REALDATA", Path(__file__).resolve().parents[2] / "shared" / "realdata"))
    cands = sorted(p for p in (root / "busi" / "benign").glob("*.png") if "_mask" not in p.name)
    return cands[0] if cands else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frame", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/img/corruptions.png"))
    args = ap.parse_args(argv)
    frame = args.frame or default_frame()
    if frame is None or not frame.is_file():
        print("no real frame found (../shared/realdata absent): figure not drawn", file=sys.stderr)
        return 0
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = cv2.imread(str(frame), cv2.IMREAD_GRAYSCALE)
    scale = 224 / max(img.shape)
    img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    mask = img > 8  # BUSI frames are cropped to the scan; this only excludes the black margins
    # the noise grain is defined at 224 px: show the frame at that size
    fig, axes = plt.subplots(3, 4, figsize=(10, 7.2))
    for r, kind in enumerate(KINDS):
        axes[r, 0].imshow(img, cmap="gray", vmin=0, vmax=255)
        axes[r, 0].set_title("clean", fontsize=9)
        axes[r, 0].set_ylabel(kind, fontsize=11)
        for c, eps in enumerate(SEVERITIES, start=1):
            out = corrupt(img, kind, eps, mask=mask, rng=0)
            if kind == "blur":
                p = blur_params(eps)
                title = f"ε={eps}: σ={p.sigma:g}, k={p.ksize}"
            elif kind == "contrast":
                title = f"ε={eps}: α={contrast_alpha(eps):.1f}"
            else:
                p = speckle_params(eps, max(img.shape))
                title = f"ε={eps}: σ_η={p.sigma_noise:.2f} → {p.std_corr:.2f}, σ_K={p.grain_px:.1f}px"
            axes[r, c].imshow(out, cmap="gray", vmin=0, vmax=255)
            axes[r, c].set_title(title, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Appendix E.2 corruptions (usjepa.shards.corruptions) on {frame.name}", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
