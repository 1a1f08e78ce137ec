#!/usr/bin/env bash
# The stream's Redis queue against a real redis-server (Debian's package): every test marked
# `redis` in the tests/test_stream*.py files (the queue contract suite's Redis half), with
# EAGLE3_REQUIRE_REDIS=1 so that a missing server fails instead of skipping. The tests start
# and stop their own server (tests/redis_support.py: a free port, no persistence).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "redis: $*"; }
make -s .venv/.installed
if ! command -v redis-server >/dev/null; then
  say "installing Debian's redis-server package"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi
say "$(redis-server --version)"
EAGLE3_REQUIRE_REDIS=1 timeout 110 .venv/bin/python -m pytest -q -m redis tests/test_stream*.py
say "OK"
