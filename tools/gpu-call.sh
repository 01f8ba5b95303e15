#!/usr/bin/env bash
# The last device call (see tools/stage-gpu-wheels.sh and docs/benchmarks.md "GPU suite"): join the parts
# that earlier calls left in .gpu-parts/, unpack them (DALI's --target install -> .gpu-site/gpu-site/, the real
# corpus -> .gpu-site/gpu-real/), install the wheels this call carries in .gpu-wheels/ (webdataset for the
# shard writer, tools/gpu-call-wheels.txt -> .gpu-site/wheels/), install the project without the network, run
# the GPU-only tests, then the suite. Everything it measures lands in $OUT (gpu_suite.json/.md, gpu_tests.log).
# On any CUDA box without parts it runs the same tests and suite with what is installed (DALI measured only if
# importable).
#   bash tools/gpu-call.sh                  # on the device
#   GPU_SITE=DIR bash tools/gpu-call.sh --unpack-only   # join + unpack + install the wheels into DIR only
#                                                       # (the rehearsal; GPU_PARTS=DIR2 reads parts from DIR2)
set -uo pipefail
SITE=${GPU_SITE:-.gpu-site}
PARTS=${GPU_PARTS:-.gpu-parts}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" "$SITE"
if compgen -G "$PARTS/*/part.*" > /dev/null; then
  echo "joining $(ls "$PARTS" | wc -l) part(s): $(du -shc "$PARTS"/*/part.* | tail -1 | cut -f1)"
  cat "$PARTS"/*/part.* | python3 -c "
import sys, tarfile
with tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz') as tf:
    tf.extractall('$SITE', filter='data')  # refuses absolute paths and '..' members
" || { echo "unpacking the parts failed (a part missing or truncated? the machine may have gone back between"
         echo "calls): ls $PARTS = $(ls "$PARTS"). Measuring without DALI."; rm -rf "$SITE/gpu-site"; }
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
