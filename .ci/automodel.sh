#!/usr/bin/env bash
# NeMo AutoModel integration: install the released nemo-automodel 0.7.0 (without its heavy
# dependencies) into .venv, check that torch and transformers were left alone, then run
# tests/integration with EAGLE3_REQUIRE_AUTOMODEL=1 so that a skipped test fails the step.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$SECONDS
versions() { .venv/bin/python -c 'import torch, transformers; print(torch.__version__, transformers.__version__)'; }

echo "== automodel: base environment (make's .venv)"
make -s .venv/.installed
before=$(versions)
echo "torch, transformers: $before"

echo "== automodel: pip install nemo-automodel==0.7.0 --no-deps, plus the 'automodel' extra"
t=$SECONDS
make -s automodel
echo "installed in $((SECONDS - t)) s"
after=$(versions)
echo "torch, transformers: $after"
if [ "$before" != "$after" ]; then
    echo "FAIL: installing nemo-automodel changed torch/transformers ($before -> $after)" >&2
    exit 1
fi
.venv/bin/pip list 2>/dev/null | grep -iE '^(nemo-automodel|datasets|pillow|torchao|torchdata|pyarrow|pandas) '

echo "== automodel: integration tests (a skip is a failure)"
t=$SECONDS
EAGLE3_REQUIRE_AUTOMODEL=1 .venv/bin/python -m pytest tests/integration -v -p no:locust -ra --durations=10
echo "tests ran in $((SECONDS - t)) s"

echo "== automodel: Locust ranks as stream consumers (upstream's loader; skipped by make test before this step)"
.venv/bin/python -m pytest tests/loadtest/test_locust_stream.py -p no:cacheprovider -ra

echo "== automodel: done in $((SECONDS - start)) s"
