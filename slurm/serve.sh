#!/usr/bin/env bash
# A standalone target-server job: one appliance per GPU (or per TENSOR_PARALLEL_SIZE GPUs) on every node, running
# until the time limit or `scancel` (or, with EXIT_WHEN_IDLE=1, until the servers go idle).
# Trainers elsewhere read the server URLs from $LOG_ROOT/<job id>/urls.txt, or follow a
# shared server list (SERVER_LIST, the trainers' EAGLE3_SERVER_LIST): this job adds its
# servers there once they are ready and removes them (then waits DRAIN_SECONDS) before it
# stops them, so trainers take a job's servers in and drain them during their run.
#
#   sbatch slurm/serve.sh
#   sbatch --nodes=4 --partition=a100 --account=proj slurm/serve.sh
#   cat slurm-logs/<job id>/urls.txt      # once the driver log says "ready"
#   SERVER_LIST=/shared/fleet.txt sbatch slurm/serve.sh   # trainers: EAGLE3_SERVER_LIST=/shared/fleet.txt
#
# Same settings as slurm/hetjob.sh (env file slurm/eagle3.env, or the environment); the
# ones that concern component 1 are ignored. docs/slurm.md.
#
#SBATCH --job-name=eagle3-serve
#SBATCH --output=eagle3-serve-%j.out    # the driver log (this script), in the submit dir
#SBATCH --time=04:00:00
#SBATCH --signal=B:TERM@120             # 2 min before the limit: stop the servers cleanly
#SBATCH --partition=gpu                 # <- your GPU partition
##SBATCH --account=my-account           # <- remove one '#' to charge an account
#SBATCH --nodes=1                       # <- server nodes
#SBATCH --ntasks-per-node=8             # <- GPUs per node (servers = this / TENSOR_PARALLEL_SIZE)
#SBATCH --gpus-per-node=8               # <- GPUs per node
#SBATCH --cpus-per-task=8

set -euo pipefail
: "${SLURM_JOB_ID:?submit this script with sbatch, see its header}"

# sbatch runs a copy of this file from a spool folder: find the original to find common.sh.
script_path=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o -m1 'Command=[^ ]*' | cut -d= -f2- || true)
SLURM_DIR=${EAGLE3_SLURM_DIR:-$(dirname "${script_path:-$SLURM_SUBMIT_DIR/slurm/serve.sh}")}
# shellcheck source=slurm/common.sh
source "$SLURM_DIR/common.sh"

EAGLE3_ENV_FILE=${EAGLE3_ENV_FILE:-$SLURM_DIR/eagle3.env}
if [[ -e $EAGLE3_ENV_FILE ]]; then load_env_file "$EAGLE3_ENV_FILE"; fi

# ==== Settings: env file or environment, else these defaults ==============================
MODEL=${MODEL:-builtin}                 # the target: a folder visible on the nodes, or a hub id
PYTHON_ENV=${PYTHON_ENV:-}              # venv holding eagle3-appliance (else: found on PATH)
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}    # pyxis image, e.g. /images/eagle3.sqsh
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-}  # pyxis mounts, e.g. /models:/models:ro
TENSOR_PARALLEL_SIZE=${TENSOR_PARALLEL_SIZE:-1} # GPUs per server (serve --tensor-parallel-size)
SERVERS_PER_NODE=${SERVERS_PER_NODE:-$(servers_per_node "${SLURM_NTASKS_PER_NODE:-1}" "$TENSOR_PARALLEL_SIZE")}
BASE_PORT=${BASE_PORT:-8001}            # server i on a node listens on BASE_PORT+i
SERVE_ARGS=${SERVE_ARGS:-}              # more `serve` flags, e.g. "--dtype bfloat16"
EXIT_WHEN_IDLE=${EXIT_WHEN_IDLE:-0}     # 1: serve --exit-when-idle (the job ends when idle)
SERVER_HOST_OVERRIDE=${SERVER_HOST_OVERRIDE:-} # server address when node names do not resolve
READY_TIMEOUT=${READY_TIMEOUT:-1800}    # seconds for every server to load its model
STOP_TIMEOUT=${STOP_TIMEOUT:-60}        # seconds for a graceful stop before SIGKILL
SERVER_LIST=${SERVER_LIST:-}            # shared file of server URLs that trainers follow (optional)
DRAIN_SECONDS=${DRAIN_SECONDS:-15}      # after leaving SERVER_LIST, before the servers stop
LOG_ROOT=${LOG_ROOT:-$SLURM_SUBMIT_DIR/slurm-logs} # logs go to $LOG_ROOT/<job id>/
APPLIANCE_CMD=${APPLIANCE_CMD:-${PYTHON_ENV:+$PYTHON_ENV/bin/}eagle3-appliance}
EAGLE3_AUTH_TOKEN_FILE=${EAGLE3_AUTH_TOKEN_FILE:-} # token file the servers require (probes need none)
# ==========================================================================================

LOG_DIR=$LOG_ROOT/$SLURM_JOB_ID
[[ $SERVERS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die 2 "SERVERS_PER_NODE=$SERVERS_PER_NODE: expected a positive integer"
if [[ -n $EAGLE3_AUTH_TOKEN_FILE ]]; then
    [[ -r $EAGLE3_AUTH_TOKEN_FILE ]] || die 2 "EAGLE3_AUTH_TOKEN_FILE=$EAGLE3_AUTH_TOKEN_FILE is not readable"
    export EAGLE3_AUTH_TOKEN_FILE
fi
[[ $DRAIN_SECONDS =~ ^[0-9]+$ ]] || die 2 "DRAIN_SECONDS=$DRAIN_SECONDS: expected a whole number of seconds"
[[ -z $SERVER_LIST ]] || command -v flock >/dev/null || die 2 "SERVER_LIST needs flock (util-linux) on the first node"
command -v curl >/dev/null || die 2 "curl is needed on the first node to poll the servers"
read -r -a serve_args <<<"$SERVE_ARGS"
mapfile -t server_container < <(container_opts "$CONTAINER_IMAGE" "$CONTAINER_MOUNTS")
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1

mapfile -t urls < <(server_urls "$SLURM_JOB_NODELIST" "$SERVERS_PER_NODE" "$BASE_PORT" "$SERVER_HOST_OVERRIDE")
log "job $SLURM_JOB_ID on $(hostname): MODEL=$MODEL on nodes $SLURM_JOB_NODELIST, $SERVERS_PER_NODE per node"
log "logs in $LOG_DIR"

server_pid=''
listed=0
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
    local rc=$?
    trap - TERM INT
    if ((listed)); then # a failure here must not keep the servers from stopping
        if server_list_update "$SERVER_LIST" remove "${urls[@]}"; then
            log "removed the servers from $SERVER_LIST; ${DRAIN_SECONDS}s for trainers to drain them"
            sleep "$DRAIN_SECONDS"
        else
            log "could not remove the servers from $SERVER_LIST; trainers will fail over when they stop"
        fi
    fi
    if [[ -n $server_pid ]]; then
        log "stopping the servers (SIGTERM)"
        stop_step "$server_pid" eagle3-servers "$STOP_TIMEOUT"
    fi
    log "job exit code $rc"
    exit "$rc"
}
trap cleanup EXIT
# scancel and the time limit are the normal end of this job: exit 0 after a clean stop.
trap 'log "SIGTERM: job cancelled or out of time"; exit 0' TERM INT

serve=("$APPLIANCE_CMD" serve --model "$MODEL" "${serve_args[@]}")
if [[ $TENSOR_PARALLEL_SIZE != 1 ]]; then serve+=(--tensor-parallel-size "$TENSOR_PARALLEL_SIZE"); fi
if [[ $EXIT_WHEN_IDLE == 1 ]]; then serve+=(--exit-when-idle); fi
srun --job-name=eagle3-servers --kill-on-bad-exit=1 \
    --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node="$SERVERS_PER_NODE" \
    --output="$LOG_DIR/server-%N-%t.log" "${server_container[@]}" \
    bash -c "$(task_script server_task)" server_task "$BASE_PORT" "$TENSOR_PARALLEL_SIZE" "${serve[@]}" &
server_pid=$!
log "starting ${#urls[@]} server(s); waiting up to ${READY_TIMEOUT}s for them to be ready"
wait_until_ready "$server_pid" "$READY_TIMEOUT" "${urls[@]}"

# Publish the URLs only once every server answers: a trainer may poll for this file.
printf '%s\n' "${urls[@]}" >"$LOG_DIR/urls.txt.tmp"
mv "$LOG_DIR/urls.txt.tmp" "$LOG_DIR/urls.txt"
log "ready: EAGLE3_TARGET_URLS=$(paste -sd, "$LOG_DIR/urls.txt") (also in $LOG_DIR/urls.txt)"
if [[ -n $SERVER_LIST ]]; then
    server_list_update "$SERVER_LIST" add "${urls[@]}"
    listed=1
    log "added ${#urls[@]} server(s) to $SERVER_LIST (trainers: EAGLE3_SERVER_LIST=$SERVER_LIST)"
fi

while kill -0 "$server_pid" 2>/dev/null; do sleep 5; done
rc=0
wait "$server_pid" || rc=$?
server_pid=''
if ((rc == 0)); then
    log "the servers exited 0 on their own"
else
    die 4 "a server ended (server step exit code $rc); see $LOG_DIR/server-*.log"
fi
