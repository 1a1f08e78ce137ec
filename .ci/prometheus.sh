#!/usr/bin/env bash
# The dashboard and the alert rules against a real Prometheus (Debian's package) scraping a
# real appliance (the built-in model on the CPU). The GPU readings come from the tests' fake
# NVML (tests/fake_nvml), so that the GPU panels have data and the GPU alerts can be provoked
# on a machine without a GPU. Steps:
#   1. promtool checks and unit-tests the rule file;
#   2. a short bounded load (`eagle3-appliance validate`, 6 batches), a non-fatal XID 13 and a
#      short stream (monitoring/stream_load.py: produced past the appliance's 1 MiB high
#      watermark, claimed, released; the run's queue on the appliance leased, acked, failed,
#      asked while empty); then every panel query returns data and every alert expression's
#      metrics have series; Eagle3StreamProducerPaused and Eagle3StreamTrainersStarving become
#      pending;
#   3. a fatal XID 79 and a GPU 99 % full: Eagle3GpuFatal, Eagle3NotReady, Eagle3GpuXid and
#      Eagle3GpuMemoryFull become pending or firing;
#   4. the server stopped: Eagle3ServerDown and Eagle3ServerMissing become pending.
# Every process is stopped by its pid at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "prometheus: $*"; }
make -s .venv/.installed
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  say "installing Debian's prometheus package"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

work=$(mktemp -d)
server_pid="" prom_pid=""
cleanup() {
  for pid in $server_pid $prom_pid; do
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { .venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() {  # URL SECONDS PID
  for _ in $(seq $(($2 * 5))); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || { say "process $3 exited"; return 1; }
    sleep 0.2
  done
  say "$1 did not answer within $2 s"; return 1
}
gpus() {  # fake NVML state: two GPUs, GPU 0 at MEMORY_USED (a share) with the XID events so far (cumulative)
  .venv/bin/python - "$work/nvml.json" "$@" <<'PY'
import json, os, sys
from tests.ops_support import healthy_gpus
path, used, xids = sys.argv[1], float(sys.argv[2]), [int(x) for x in sys.argv[3:]]
gpus = healthy_gpus()
gpus[0]["memory_used"] = int(used * gpus[0]["memory_total"])
with open(path + ".tmp", "w") as f:
    json.dump({"gpus": gpus, "xid_events": [{"gpu": 0, "xid": x} for x in xids]}, f)
os.replace(path + ".tmp", path)
PY
}

say "promtool check rules / test rules"
promtool check rules monitoring/prometheus/alerts.yml
promtool test rules monitoring/prometheus/alerts_test.yml

export PYTHONPATH="$PWD/tests/fake_nvml:$PWD/appliance:$PWD/client:$PWD/loadtest:$PWD"
export FAKE_NVML_STATE="$work/nvml.json" HF_HUB_OFFLINE=1
gpus 0.125
port=$(free_port)
say "appliance on 127.0.0.1:$port (built-in model, fake NVML, stream answers up to 1 MiB)"
.venv/bin/eagle3-appliance serve --host 127.0.0.1 --port "$port" --gpu-poll-interval 0.5 --stream-memory-mb 1 \
  --cache-dir "${EAGLE3_CACHE_DIR:-.cache/eagle3-appliance}" >"$work/server.log" 2>&1 &
server_pid=$!
wait_for "http://127.0.0.1:$port/health/ready" 120 "$server_pid" || { cat "$work/server.log"; exit 1; }

prom_port=$(free_port)
cp monitoring/prometheus/alerts.yml "$work/alerts.yml"
cat >"$work/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [alerts.yml]
scrape_configs:
  - job_name: eagle3-appliance
    static_configs:
      - targets: ["127.0.0.1:$port"]
YML
promtool check config "$work/prometheus.yml" >/dev/null
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" >"$work/prometheus.log" 2>&1 &
prom_pid=$!
prom="http://127.0.0.1:$prom_port"
wait_for "$prom/-/ready" 30 "$prom_pid" || { cat "$work/prometheus.log"; exit 1; }
say "Prometheus $(prometheus --version 2>&1 | head -n1 | awk '{print $3}') on $prom"

say "load: eagle3-appliance validate (6 batches), a non-fatal XID 13"
gpus 0.125 13
timeout 120 .venv/bin/eagle3-appliance validate --url "http://127.0.0.1:$port" --batches 6 \
  --cache-dir "${EAGLE3_CACHE_DIR:-.cache/eagle3-appliance}"
# One bad request, so that the failures-by-status panel has a series (a status label appears
# with its first request; a healthy server has none).
curl -s -o /dev/null -w "prometheus: a bad /generate answers %{http_code}\n" \
  -X POST --data-binary 'not a wire blob' "http://127.0.0.1:$port/generate"
say "stream: produce past the high watermark, claim, release; the run's queue on the appliance"
timeout 60 .venv/bin/python -m monitoring.stream_load --url "http://127.0.0.1:$port"
.venv/bin/python -m monitoring.check data --prometheus "$prom" --window 1m --timeout 45
.venv/bin/python -m monitoring.check alerts --prometheus "$prom" --timeout 45 \
  Eagle3StreamProducerPaused Eagle3StreamTrainersStarving

say "provoke: fatal XID 79, GPU 0 at 99 % memory"
gpus 0.99 13 79
.venv/bin/python -m monitoring.check alerts --prometheus "$prom" --timeout 45 \
  Eagle3GpuFatal Eagle3NotReady Eagle3GpuXid Eagle3GpuMemoryFull

say "provoke: stop the server"
kill "$server_pid"
for _ in $(seq 150); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.2; done
server_pid=""
.venv/bin/python -m monitoring.check alerts --prometheus "$prom" --timeout 45 Eagle3ServerDown Eagle3ServerMissing
say "OK"
