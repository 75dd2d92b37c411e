#!/usr/bin/env bash
# One command for a GPU machine: the environment, the CUDA tests, then the measurements of device_check.py
# (the paper's Table 3 at real size, calibration cost, global selection, dense vs sparse delta gradient).
#
#   bash benchmarks/device_check.sh                     # on a GPU: DINOv2-L, 512x512, batch 4, bf16
#   bash benchmarks/device_check.sh --device cpu --tiny # the same sections at a reduced size, on the CPU
#
# Options: --device cuda|cpu (default cuda), --tiny (reduced size). Exits non-zero if a section fails.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
TINY=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="${2:?--device needs a value: cuda or cpu}"; shift 2 ;;
    --device=*) DEVICE="${1#--device=}"; shift ;;
    --tiny) TINY=(--tiny); shift ;;
    *) echo "device_check.sh: unknown option '$1' (options: --device cuda|cpu, --tiny)" >&2; exit 2 ;;
  esac
done
PYTHON="${PYTHON:-python3}"
start=$(date +%s)

echo "# FisherTune device check (--device $DEVICE ${TINY[*]:-})"
echo
echo "## Environment"
echo
"$PYTHON" - <<'PY'
import platform
from importlib.metadata import version

import torch

print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA build {torch.version.cuda}")
for name in ("transformers", "peft", "accelerate", "peft-fishertune"):
    print(f"{name} {version(name)}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
    print(f"bf16 supported: {torch.cuda.is_bf16_supported()}")
else:
    print("no CUDA device visible to torch")
print(f"CPU threads: {torch.get_num_threads()}")
PY
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
fi

echo
echo "## CUDA tests (tests/test_cuda.py)"
echo
if [ "$DEVICE" = cpu ]; then
  echo "(--device cpu: the device-independent ones run on the CPU; the sync test needs CUDA and skips)"
fi
FISHERTUNE_TEST_DEVICE="$DEVICE" "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tail -n 15
tests=${PIPESTATUS[0]}

"$PYTHON" benchmarks/device_check.py --device "$DEVICE" "${TINY[@]}"
measured=$?

echo
echo "device check took $(( $(date +%s) - start )) s (tests: exit $tests, measurements: exit $measured)"
[ "$tests" -eq 0 ] && [ "$measured" -eq 0 ]
