#!/usr/bin/env bash
# Install the project's measurement environment onto a CUDA machine without network access (an air-gapped
# hospital or cluster node) from wheel parts carried in by hand, then run the GPU-only tests and the GPU suite.
# tools/stage-gpu-wheels.sh (on a machine with network) packs DALI's --target install and an ingested real
# corpus into parts of <= 58 MiB under .gpu-parts/NN/, and the pure-Python wheels into .gpu-wheels/.
# Each transfer may bring only some parts, and a later transfer may replace the checkout's untracked files
# (what one transfer brought under .gpu-parts/ can be gone after the next), so every part is moved out of the
# checkout as soon as it arrives:
#   bash tools/gpu-call.sh --stash          # after each part's transfer: .gpu-parts/*/part.* -> $GPU_PARTS
#   bash tools/gpu-call.sh                  # after the last one: join the stashed parts and any still under
#                                           # .gpu-parts/, unpack (DALI -> .gpu-site/gpu-site/, the real
#                                           # corpus -> .gpu-site/gpu-real/), install .gpu-wheels/ (webdataset
#                                           # for the shard writer) and the project without the network, run the
#                                           # GPU-only tests, then the suite; results in $OUT
#   GPU_SITE=DIR bash tools/gpu-call.sh --unpack-only   # join + unpack + install the wheels into DIR only
# GPU_PARTS (default /tmp/usjepa-gpu-parts) is outside the checkout; GPU_CARRIED (default .gpu-parts) is
# where the transfers put them. On any CUDA box without parts it runs the
# same tests and suite with what is installed (DALI measured only if importable).
set -uo pipefail
SITE=${GPU_SITE:-.gpu-site}
PARTS=${GPU_PARTS:-/tmp/usjepa-gpu-parts}
CARRIED=${GPU_CARRIED:-.gpu-parts}  # where a transfer puts the parts (inside the checkout)
OUT=${OUT:-gpu_out}
stash() {  # parts carried into the checkout -> $PARTS, which the next transfer cannot replace
  mkdir -p "$PARTS"
  if compgen -G "$CARRIED/*/part.*" > /dev/null; then mv "$CARRIED"/*/part.* "$PARTS"/; fi
}
if [[ "${1:-}" == "--stash" ]]; then
  stash
  echo "stashed in $PARTS: $(ls "$PARTS" | tr '\n' ' ')($(du -sh "$PARTS" | cut -f1))"
  exit 0
fi
stash
mkdir -p "$OUT" "$SITE"
if compgen -G "$PARTS/part.*" > /dev/null; then
  echo "joining $(ls "$PARTS"/part.* | wc -l) part(s): $(du -shc "$PARTS"/part.* | tail -1 | cut -f1)"
  # part.00, part.01, ...: the glob sorts them; a missing one makes the xz stream fail below
  cat "$PARTS"/part.* | python3 -c "
import sys, tarfile
with tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz') as tf:
    tf.extractall('$SITE', filter='data')  # refuses absolute paths and '..' members
" || { echo "unpacking the parts failed (a part missing or truncated? the machine may have been restarted"
         echo "between transfers): ls $PARTS = $(ls "$PARTS"). Measuring without DALI."; rm -rf "$SITE/gpu-site"; }
  rm -rf "$PARTS"
fi
# Carried by this call itself, not by a part: a part lost between calls costs DALI, never the shard writer.
# Their own needs (numpy, pyyaml) are on the device: --no-deps (tests/test_gpu_suite.py checks this).
rm -rf "$SITE/wheels"
if compgen -G ".gpu-wheels/*.whl" > /dev/null; then
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE/wheels" \
    .gpu-wheels/*.whl \
    || echo "installing .gpu-wheels failed: the suite will say what is missing"
else
  echo "no .gpu-wheels carried (bash tools/stage-gpu-wheels.sh --wheels-only here, then carry it): no webdataset"
fi
[[ "${1:-}" == "--unpack-only" ]] && exit 0
for dir in gpu-site wheels; do
  [[ -d "$SITE/$dir" ]] && export PYTHONPATH="$(cd "$SITE/$dir" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
done
REAL=(); [[ -f "$SITE/gpu-real/manifest.json" ]] && REAL=(--real-root "$SITE/gpu-real")
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.csv"
python3 -c "import nvidia.dali as d; print('DALI', d.__version__)" 2>&1 | tail -1
python3 -c "import webdataset as w; print('webdataset', w.__version__, 'from', w.__file__)" 2>&1 | tail -1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
# GPU-only tests first (about a minute): the sync check, the GPU decode path, the speckle statistics
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_sync.py tests/test_gpu_decode.py tests/test_device_speckle.py \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -5
python3 -m benchmarks.gpu_suite --out "$OUT" "${REAL[@]}" --budget-s "${SUITE_BUDGET_S:-360}"
