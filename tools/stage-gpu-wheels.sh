#!/usr/bin/env bash
# Stage what an air-gapped CUDA machine lacks, in as few <= 64 MiB transfers as possible: the small pure-Python
# wheels every call that runs the project carries (webdataset for the shard writer: tools/gpu-call-wheels.txt,
# 88 KiB -> .gpu-wheels/), then DALI (the smallest set that imports and runs our pipeline) and an ingested
# real corpus in parts. Run from the project root, after `make install`:
#
#   bash tools/stage-gpu-wheels.sh               # -> .gpu-wheels/ + .gpu-parts/NN/part.NN, and prints the calls
#   bash tools/stage-gpu-wheels.sh --wheels-only # -> .gpu-wheels/ alone (seconds): a call without DALI
#   GPU_PY=3.11 CHECK_PY=/path/to/python-without-them bash tools/stage-gpu-wheels.sh [--wheels-only] --rehearse
#        # here: the same for this machine's Python, then the device's join + unpack + wheel install, a
#        # webdataset import + the suite's dry run (shards written), and (without --wheels-only) a DALI run
#
# What travels is not the wheels but their --target install for the device's Python (3.12), done here with
# pip's --python-version/--platform, trimmed (extension modules of other Python versions, C++ headers) and
# xz-compressed into one stream with the real corpus, then split into parts. The device's last call joins
# the parts and unpacks them with Python's tarfile (tools/gpu-call.sh): no pip install of DALI there.
# Measured on 2026-12-01 (docs/benchmarks.md, "Bringing DALI"): the old script's wheel set is 498.7 MiB
# (9 calls); the smallest set that imports and runs the pipeline 440.9 MiB of wheels; installed for 3.12,
# trimmed and xz'ed 237.6 MiB; with the real corpus 264 MiB = 5 calls. xz takes ~8 min on 2 busy cores.
set -euo pipefail
PY=${GPU_PY:-3.12}
PART_MIB=${PART_MIB:-58}  # + the tracked tree (3.4 MiB on 2026-12-01) + .gpu-wheels stay under one call's 64 MiB
REALDATA=${REALDATA:-../shared/realdata}
VENV_PY=${VENV_PY:-.venv/bin/python}
# DALI needs astunparse, gast (autograph, for the pipeline's conditionals) and optree at import; six, numpy
# and packaging are on the device. nvidia-nvjpeg-cu12 is dlopened by nvImageCodec for the GPU ("mixed")
# JPEG decode (the device's CUDA 13 has libnvjpeg.so.13, not .12). Left out, each checked by importing
# DALI and running our pipeline without it: nvcomp, nvjpeg2k, nvtiff (other codecs), libcst, nvtx,
# makefun, webdataset, braceexpand (webdataset and braceexpand travel apart, in .gpu-wheels: see above).
WHEELS=(nvidia-dali-cuda120==2.4.0 nvidia-nvimgcodec-cu12==0.9.0.20 nvidia-nvjpeg-cu12==12.4.0.76
        astunparse==1.6.3 gast==0.7.0 optree==0.20.0 ${EXTRA_WHEELS:-})
REHEARSE=0 WHEELS_ONLY=0
for arg in "$@"; do
  case $arg in
    --rehearse) REHEARSE=1 ;;
    --wheels-only) WHEELS_ONLY=1 ;;
    *) echo "usage: $0 [--wheels-only] [--rehearse]" >&2; exit 2 ;;
  esac
done
tag=cpython-${PY/./}
stage=.gpu-stage
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
rm -rf .gpu-wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  "${PLATFORMS[@]}" -d .gpu-wheels -r tools/gpu-call-wheels.txt
echo "$(ls .gpu-wheels | tr '\n' ' ')-> .gpu-wheels/ ($(du -sk .gpu-wheels | cut -f1) KiB): carry it in every call"

rehearse_wheels() {  # after the device's wheel install (tools/gpu-call.sh): webdataset from there, and the suite
  local tmp=$1 py=${CHECK_PY:-$VENV_PY}  # CHECK_PY: an interpreter without webdataset of its own
  PYTHONPATH="$tmp/wheels${PYTHONPATH:+:$PYTHONPATH}" "$py" -c "
import webdataset
assert webdataset.__file__.startswith('$tmp'), webdataset.__file__
print('rehearsal: webdataset', webdataset.__version__, 'from', webdataset.__file__)"
  PYTHONPATH="$tmp/wheels${PYTHONPATH:+:$PYTHONPATH}" "$py" -m benchmarks.gpu_suite --dry-run --only speckle \
    --out "$tmp/suite" > /dev/null
  "$py" -c "
import json
r = json.load(open('$tmp/suite/gpu_suite.json'))
print('rehearsal: gpu_suite --dry-run wrote', r['data']['synthetic']['frames'], 'frames of shards with webdataset',
      r['env']['webdataset'], '-> speckle', r['speckle']['device_ms_per_batch'] > 0)"
}

if (( WHEELS_ONLY )); then
  if (( REHEARSE )); then
    # no parts here, so that staged DALI parts are neither joined nor removed
    tmp=$(mktemp -d); GPU_CARRIED="$tmp/none" GPU_PARTS="$tmp/none" GPU_SITE="$tmp" bash tools/gpu-call.sh --unpack-only
    rehearse_wheels "$tmp"; rm -rf "$tmp"
  else
    echo "  run carry=[\".gpu-wheels\"] timeout_s=600 command='SUITE_BUDGET_S=360 bash tools/gpu-call.sh'  (no DALI)"
  fi
  exit 0
fi
rm -rf "$stage" .gpu-parts && mkdir -p "$stage/wheels" .gpu-parts
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  "${PLATFORMS[@]}" -d "$stage/wheels" "${WHEELS[@]}"
wheel_mib=$(du -cm "$stage"/wheels/*.whl | tail -1 | cut -f1)
python3 -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: --python-version "$PY" \
  --implementation cp "${PLATFORMS[@]}" --target "$stage/gpu-site" "$stage"/wheels/*.whl
# trim what the device's Python never loads
find "$stage/gpu-site" -name "*.cpython-3*-x86_64-linux-gnu.so" ! -name "*.${tag}-*" -delete
rm -rf "$stage/gpu-site/nvidia/dali/include" "$stage/gpu-site/bin"
# nvImageCodec's JPEG 2000 and TIFF extensions: their libraries are not brought, and loading them only logs errors
rm -f "$stage"/gpu-site/nvidia/nvimgcodec/extensions/lib{nvjpeg2k,nvtiff}_ext.so*
find "$stage/gpu-site" -name __pycache__ -prune -exec rm -rf {} +
site_mib=$(du -sm "$stage/gpu-site" | cut -f1)
# the shared real data, ingested here (POCUS videos every 4th frame, BUSI, DDTI crops), for the loader section
if [[ -d "$REALDATA/pocus" ]]; then
  "$VENV_PY" -m usjepa.ingest.cli run "$REALDATA/pocus" "$REALDATA/busi" "$REALDATA/ddti/cropped" \
    --out "$stage/gpu-real" --stride 4 --workers 2 --quiet
fi
members=(gpu-site); [[ -d "$stage/gpu-real" ]] && members+=(gpu-real)
tar -C "$stage" -cf - "${members[@]}" | xz -6 -T0 > "$stage/payload.tar.xz"
split -b "${PART_MIB}M" -d -a 2 "$stage/payload.tar.xz" "$stage/part."
n=0
for p in "$stage"/part.*; do d=.gpu-parts/$(printf %02d $n); mkdir -p "$d"; mv "$p" "$d/"; n=$((n+1)); done
payload_mib=$(du -sm .gpu-parts | cut -f1)
echo "wheels ${wheel_mib} MiB -> --target install for Python $PY ${site_mib} MiB (trimmed) -> ${payload_mib} MiB" \
     "xz with ${members[*]} in $n part(s) of <= ${PART_MIB} MiB under .gpu-parts/"
rm -rf "$stage"
if (( REHEARSE )); then
  # the device's side, here: join + unpack (tools/gpu-call.sh) into a temporary folder, then import + run
  tmp=$(mktemp -d)
  GPU_PARTS="$tmp/parts" GPU_SITE="$tmp" bash tools/gpu-call.sh --unpack-only
  rehearse_wheels "$tmp"
  # CHECK_PY: an interpreter without DALI of its own (else the import could find that one)
  PYTHONPATH="$tmp/gpu-site:$tmp/wheels" "${CHECK_PY:-$VENV_PY}" -c "
import sys, tempfile
import nvidia.dali as dali, nvidia.dali.plugin.pytorch
assert dali.__file__.startswith('$tmp'), dali.__file__
from usjepa.shards.synthetic_shards import write_synthetic_corpus
from usjepa.shards.loader import build_loader
root = write_synthetic_corpus(tempfile.mkdtemp(), {'a': 32}, size=(96, 128), per_shard=16, seed=0)
loader = build_loader(root, 'train', 8, {'num_workers': 1, 'cap': None}, None, 0, 1, 'cpu', 0, 'dali')
assert loader.backend_name == 'dali'
print('rehearsal: DALI', dali.__version__, 'from', dali.__file__, '->', sum(len(b) for b in loader), 'images')
loader.close()"
  rm -rf "$tmp"
  exit 0
fi
echo "Carry them to the CUDA machine one transfer at a time (e.g. a tool that copies the checkout's ignored"
echo "paths you name, or a USB stick): after each part's transfer move it out of the checkout, since the next"
echo "transfer may replace it; the last transfer brings .gpu-wheels too and runs the measurements:"
for ((i=0;i<n;i++)); do
  d=$(printf %02d $i)
  if (( i < n-1 )); then
    echo "  carry .gpu-parts/$d, then run: bash tools/gpu-call.sh --stash     (-> /tmp/usjepa-gpu-parts)"
  else
    echo "  carry .gpu-parts/$d and .gpu-wheels, then run: SUITE_BUDGET_S=360 bash tools/gpu-call.sh"
  fi
done
