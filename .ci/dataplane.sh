#!/usr/bin/env bash
# Data planes, beyond the tests that `make test` runs (tests/dataplane): the transport
# benchmark (smaller answers than the 300 MB of docs/performance.md so CI stays quick; it also checks
# that gloo and wire answers are identical) and the GPU check script (it says so and exits
# 0 when no GPU is visible; on a GPU runner it checks the NCCL and CUDA paths).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || make "$VENV/.installed"
PY="$VENV/bin/python"

echo "== data planes: transport benchmark (MB/s per tier beside a raw loopback socket)"
"$PY" -m benchmarks.transport --draft-vocab 8192 --repeats 2

echo "== data planes: GPU check"
"$PY" tests/gpu/check_dataplanes.py
"$PY" tests/gpu/check_large_targets.py
"$PY" tests/gpu/check_serving_speed.py
"$PY" tests/gpu/check_long_samples.py
"$PY" tests/gpu/check_stream.py
