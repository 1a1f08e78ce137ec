#!/usr/bin/env bash
# Wire-path benchmark, short form: prints the throughput table (informational: timings on a
# shared CI machine are noisy and never gate) and checks what is not a timing: every
# answer bit-exact, and the server's peak RSS not growing with the requests (wide case).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== bench: python -m benchmarks.wire (tiny + wide, 8 requests each)"
make -s .venv/.installed
out=$(mktemp)
trap 'rm -f "$out"' EXIT
.venv/bin/python -m benchmarks.wire --cases tiny,wide --requests 8 --raw-reps 4 --cache-dir "${EAGLE3_CACHE_DIR:-.cache/eagle3-appliance}" | tee "$out"
tail -n 1 "$out" | .venv/bin/python -c '
import json, sys
failed = False
for case in json.loads(sys.stdin.read())["cases"]:
    name, ratio = case["case"], case["wire_vs_raw"]
    exact = case["bit_exact"] and case["projection_exact"]
    growth, payload = case["server_hwm_growth_mb"], case["payload_bytes"] / 2**20
    print(f"bench: {name}: bit-exact={exact} wire/raw={ratio:.0%} "
          f"server peak RSS growth after warm-up {growth:.1f} MB (payload {payload:.0f} MB)")
    failed |= not exact
    if name == "wide" and growth > 0.25 * payload:
        print("bench: FAIL: the server peak RSS grows with the requests")
        failed = True
sys.exit(1 if failed else 0)
'

# Stream benchmark, smoke form: the three ways through the steady scenario, 6 samples each
# (prints the table; nothing here is a timing assertion).
echo "== bench: python -m benchmarks.stream (steady, 6 samples per way)"
make -s automodel  # the stream's trainer is upstream's FeatureDataLoader (nemo-automodel, --no-deps)
.venv/bin/python -m benchmarks.stream --samples 6 --scenarios steady --head-start 3 --capacity-samples 4 \
    --cache-dir "${EAGLE3_CACHE_DIR:-.cache/eagle3-appliance}" | tee "$out"
tail -n 1 "$out" | .venv/bin/python -c '
import json, sys
rows = json.loads(sys.stdin.read())["results"]
short = [r["way"] for r in rows if r["distinct"] != 6]
print(f"bench: stream smoke: {len(rows)} ways, every sample trained: {not short}")
sys.exit(1 if short or len(rows) != 3 else 0)
'
echo "bench: OK"
