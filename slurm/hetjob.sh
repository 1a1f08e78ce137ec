#!/usr/bin/env bash
# One heterogeneous Slurm job: serve a frozen EAGLE-3 target on GPU nodes (component 0) and
# run a draft trainer, a bit-exact validation or a Locust load test against it (component 1).
# Both components start together; the servers stop when component 1 ends; the job's exit
# code is component 1's.
#
#   sbatch slurm/hetjob.sh                                   # MODE=validate (the default)
#   MODE=train sbatch slurm/hetjob.sh torchrun ... train.py  # your trainer, URLs in the env
#   MODE=locust sbatch slurm/hetjob.sh                       # distributed Locust from loadtest/
#
# Resources: edit the #SBATCH lines below, or override them at submission. Options before
# the script name apply to both components; ':' separates per-component options:
#   sbatch --partition=a100 --account=proj slurm/hetjob.sh
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 : --nodes=1 slurm/hetjob.sh
# Settings (model, image, mode, ports...): slurm/eagle3.env (copy eagle3.env.example), or
# the environment at submission, which wins over the file. docs/slurm.md.
#
# ---- component 0: target servers, one appliance per TENSOR_PARALLEL_SIZE GPUs (default 1) ---
#SBATCH --job-name=eagle3
#SBATCH --output=eagle3-%j.out          # the driver log (this script), in the submit dir
#SBATCH --time=04:00:00
#SBATCH --signal=B:TERM@120             # 2 min before the limit: stop the servers cleanly
#SBATCH --partition=gpu                 # <- your GPU partition
##SBATCH --account=my-account           # <- remove one '#' to charge an account
#SBATCH --nodes=1                       # <- server nodes
#SBATCH --ntasks-per-node=8             # <- GPUs per node (servers = this / TENSOR_PARALLEL_SIZE)
#SBATCH --gpus-per-node=8               # <- GPUs per node
#SBATCH --cpus-per-task=8
#SBATCH hetjob
# ---- component 1: trainer, validation client or Locust load generators --------------------
#SBATCH --time=04:00:00
#SBATCH --partition=gpu                 # <- partition of the trainer nodes
#SBATCH --nodes=1                       # <- trainer nodes
#SBATCH --ntasks-per-node=8             # <- tasks per trainer node (srun runs MODE=train on each)
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8

set -euo pipefail
: "${SLURM_JOB_ID:?submit this script with sbatch, see its header}"

# sbatch runs a copy of this file from a spool folder: find the original to find common.sh.
script_path=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o -m1 'Command=[^ ]*' | cut -d= -f2- || true)
SLURM_DIR=${EAGLE3_SLURM_DIR:-$(dirname "${script_path:-$SLURM_SUBMIT_DIR/slurm/hetjob.sh}")}
# shellcheck source=slurm/common.sh
source "$SLURM_DIR/common.sh"
REPO_DIR=$(cd "$SLURM_DIR/.." && pwd)

EAGLE3_ENV_FILE=${EAGLE3_ENV_FILE:-$SLURM_DIR/eagle3.env}
if [[ -e $EAGLE3_ENV_FILE ]]; then load_env_file "$EAGLE3_ENV_FILE"; fi

# ==== Settings: env file or environment, else these defaults ==============================
MODE=${MODE:-validate}                  # what component 1 runs: validate | train | locust
MODEL=${MODEL:-builtin}                 # the target: a folder visible on the nodes, or a hub id
PYTHON_ENV=${PYTHON_ENV:-}              # venv holding eagle3-appliance (else: found on PATH)
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}    # pyxis image for the servers, e.g. /images/eagle3.sqsh
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-}  # pyxis mounts, e.g. /models:/models:ro
CLIENT_IMAGE=${CLIENT_IMAGE:-auto}      # component 1's image; auto: CONTAINER_IMAGE, none if train
TENSOR_PARALLEL_SIZE=${TENSOR_PARALLEL_SIZE:-1} # GPUs per server (serve --tensor-parallel-size)
SERVERS_PER_NODE=${SERVERS_PER_NODE:-$(servers_per_node "${SLURM_NTASKS_PER_NODE_HET_GROUP_0:-1}" "$TENSOR_PARALLEL_SIZE")}
BASE_PORT=${BASE_PORT:-8001}            # server i on a node listens on BASE_PORT+i
SERVE_ARGS=${SERVE_ARGS:-}              # more `serve` flags, e.g. "--dtype bfloat16"
EXIT_WHEN_IDLE=${EXIT_WHEN_IDLE:-0}     # 1: serve --exit-when-idle (needs an appliance that has it)
SERVER_HOST_OVERRIDE=${SERVER_HOST_OVERRIDE:-} # server address when node names do not resolve
READY_TIMEOUT=${READY_TIMEOUT:-1800}    # seconds for every server to load its model
STOP_TIMEOUT=${STOP_TIMEOUT:-60}        # seconds for a graceful stop before SIGKILL
WATCH_INTERVAL=${WATCH_INTERVAL:-5}     # seconds between checks that the servers still run
LOG_ROOT=${LOG_ROOT:-$SLURM_SUBMIT_DIR/slurm-logs} # logs go to $LOG_ROOT/<job id>/
TRAIN_CMD=${TRAIN_CMD:-}                # MODE=train: shell command per task (or the script's args)
CLIENT_SRUN_ARGS=${CLIENT_SRUN_ARGS:-}  # MODE=train: more srun options for component 1
VALIDATE_ARGS=${VALIDATE_ARGS:-}        # MODE=validate: e.g. "--batches 8 --seq-len 512"
LOCUST_FILE=${LOCUST_FILE:-$REPO_DIR/loadtest}
LOCUST_USERS=${LOCUST_USERS:-32}
LOCUST_SPAWN_RATE=${LOCUST_SPAWN_RATE:-8}
LOCUST_RUN_TIME=${LOCUST_RUN_TIME:-5m}
LOCUST_WORKERS=${LOCUST_WORKERS:-${SLURM_NTASKS_HET_GROUP_1:-1}}
LOCUST_MASTER_PORT=${LOCUST_MASTER_PORT:-5557}
LOCUST_MASTER_HOST=${LOCUST_MASTER_HOST:-}  # master address for workers; default: first node
LOCUST_ARGS=${LOCUST_ARGS:-}            # more locust options, e.g. "--tags generate"
EAGLE3_AUTH_TOKEN_FILE=${EAGLE3_AUTH_TOKEN_FILE:-} # token file: servers require it, clients send it
APPLIANCE_CMD=${APPLIANCE_CMD:-${PYTHON_ENV:+$PYTHON_ENV/bin/}eagle3-appliance}
LOCUST_CMD=${LOCUST_CMD:-${PYTHON_ENV:+$PYTHON_ENV/bin/}locust}
# ==========================================================================================

LOG_DIR=$LOG_ROOT/$SLURM_JOB_ID
case $MODE in validate | train | locust) ;; *) die 2 "MODE=$MODE: expected validate, train or locust" ;; esac
[[ ${SLURM_HET_SIZE:-1} -ge 2 ]] || die 2 "not a heterogeneous job (submit with sbatch, keep the '#SBATCH hetjob' line)"
[[ $SERVERS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die 2 "SERVERS_PER_NODE=$SERVERS_PER_NODE: expected a positive integer"
command -v curl >/dev/null || die 2 "curl is needed on the first server node to poll the servers"
if [[ $MODE == train && -z $TRAIN_CMD && $# -eq 0 ]]; then
    die 2 "MODE=train needs TRAIN_CMD or a command after the script name"
fi

# Settings strings as word lists (split on whitespace; no quoting inside them).
read -r -a serve_args <<<"$SERVE_ARGS"
read -r -a client_srun_args <<<"$CLIENT_SRUN_ARGS"
read -r -a validate_args <<<"$VALIDATE_ARGS"
read -r -a locust_args <<<"$LOCUST_ARGS"
if [[ $CLIENT_IMAGE == auto ]]; then
    CLIENT_IMAGE=$CONTAINER_IMAGE
    if [[ $MODE == train ]]; then CLIENT_IMAGE=''; fi
fi
mapfile -t server_container < <(container_opts "$CONTAINER_IMAGE" "$CONTAINER_MOUNTS")
mapfile -t client_container < <(container_opts "$CLIENT_IMAGE" "$CONTAINER_MOUNTS")

mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1 # server and client logs appear as they are written
if [[ -n $EAGLE3_AUTH_TOKEN_FILE ]]; then
    # The servers read it as --auth-token-file, our client (validate, a trainer) sends its
    # token; Locust takes the token itself. Readiness polling needs none.
    [[ -r $EAGLE3_AUTH_TOKEN_FILE ]] || die 2 "EAGLE3_AUTH_TOKEN_FILE=$EAGLE3_AUTH_TOKEN_FILE is not readable"
    export EAGLE3_AUTH_TOKEN_FILE
    if [[ $MODE == locust && -z ${LOCUST_AUTH_TOKEN:-} ]]; then
        LOCUST_AUTH_TOKEN=$(<"$EAGLE3_AUTH_TOKEN_FILE")
        export LOCUST_AUTH_TOKEN
    fi
fi

mapfile -t urls < <(server_urls "$SLURM_JOB_NODELIST_HET_GROUP_0" "$SERVERS_PER_NODE" "$BASE_PORT" "$SERVER_HOST_OVERRIDE")
EAGLE3_TARGET_URLS=$(IFS=,; echo "${urls[*]}")
export EAGLE3_TARGET_URLS EAGLE3_URLS=$EAGLE3_TARGET_URLS EAGLE3_LOG_DIR=$LOG_DIR
printf '%s\n' "${urls[@]}" >"$LOG_DIR/urls.txt"

log "job $SLURM_JOB_ID on $(hostname): MODE=$MODE MODEL=$MODEL, logs in $LOG_DIR"
log "component 0 (servers): nodes $SLURM_JOB_NODELIST_HET_GROUP_0, $SERVERS_PER_NODE server(s) per node"
log "component 1 ($MODE): nodes $SLURM_JOB_NODELIST_HET_GROUP_1, ${SLURM_NTASKS_HET_GROUP_1:-?} task(s)"
log "EAGLE3_TARGET_URLS=$EAGLE3_TARGET_URLS"

# ---- teardown: whatever happens, stop component 1 and the servers ------------------------
server_pid=''
client_pids=()  # srun pids of component 1; the first one's exit code is the job's
client_names=() # their step names, for scancel
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
    local rc=$? i
    trap - TERM INT
    for i in "${!client_pids[@]}"; do
        stop_step "${client_pids[i]}" "${client_names[i]}" "$STOP_TIMEOUT"
    done
    if [[ -n $server_pid ]]; then
        log "stopping the servers (SIGTERM)"
        stop_step "$server_pid" eagle3-servers "$STOP_TIMEOUT"
    fi
    log "job exit code $rc"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "SIGTERM: job cancelled or out of time"; exit 143' TERM INT

# ---- component 0: the servers -----------------------------------------------------------
serve=("$APPLIANCE_CMD" serve --model "$MODEL" "${serve_args[@]}")
if [[ $TENSOR_PARALLEL_SIZE != 1 ]]; then serve+=(--tensor-parallel-size "$TENSOR_PARALLEL_SIZE"); fi
if [[ $EXIT_WHEN_IDLE == 1 ]]; then serve+=(--exit-when-idle); fi
srun --het-group=0 --job-name=eagle3-servers --kill-on-bad-exit=1 \
    --nodes="$SLURM_JOB_NUM_NODES_HET_GROUP_0" --ntasks-per-node="$SERVERS_PER_NODE" \
    --output="$LOG_DIR/server-%N-%t.log" "${server_container[@]}" \
    bash -c "$(task_script server_task)" server_task "$BASE_PORT" "$TENSOR_PARALLEL_SIZE" "${serve[@]}" &
server_pid=$!
log "starting ${#urls[@]} server(s); waiting up to ${READY_TIMEOUT}s for them to be ready"
wait_until_ready "$server_pid" "$READY_TIMEOUT" "${urls[@]}"

# ---- component 1 ------------------------------------------------------------------------
# start_client NAME LOG SRUN_OPTION... -- CMD...: one step of component 1, in the background.
start_client() {
    local name=$1 output=$2 opts=()
    shift 2
    while [[ $1 != -- ]]; do
        opts+=("$1")
        shift
    done
    shift
    srun --het-group=1 --job-name="$name" --output="$LOG_DIR/$output" "${opts[@]}" \
        "${client_container[@]}" bash -c "$(task_script client_task)" client_task 1 "$@" &
    client_pids+=($!)
    client_names+=("$name")
}

case $MODE in
validate)
    client_log=validate.log
    start_client eagle3-validate "$client_log" --nodes=1 --ntasks=1 -- \
        "$APPLIANCE_CMD" validate --url "$EAGLE3_TARGET_URLS" --model "$MODEL" "${validate_args[@]}"
    ;;
train)
    client_log='train-%N-%t.log'
    if (($#)); then train=("$@"); else train=(bash -c "$TRAIN_CMD"); fi
    start_client eagle3-train "$client_log" "${client_srun_args[@]}" -- "${train[@]}"
    ;;
locust)
    # One master on the first component-1 node, one worker per component-1 task.
    client_log=locust-master.log
    master_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_1" | head -n1)
    master_host=${LOCUST_MASTER_HOST:-$master_node}
    start_client eagle3-locust-master "$client_log" --nodes=1 --ntasks=1 --nodelist="$master_node" --overlap -- \
        "$LOCUST_CMD" -f "$LOCUST_FILE" --headless --master --master-bind-port="$LOCUST_MASTER_PORT" \
        --expect-workers="$LOCUST_WORKERS" --expect-workers-max-wait=300 \
        -u "$LOCUST_USERS" -r "$LOCUST_SPAWN_RATE" -t "$LOCUST_RUN_TIME" \
        --host "${urls[0]}" --csv "$LOG_DIR/locust" "${locust_args[@]}"
    start_client eagle3-locust-workers 'locust-worker-%N-%t.log' --ntasks="$LOCUST_WORKERS" --overlap -- \
        "$LOCUST_CMD" -f "$LOCUST_FILE" --worker --master-host="$master_host" --master-port="$LOCUST_MASTER_PORT"
    ;;
esac
log "component 1 started: $MODE, log $LOG_DIR/$client_log"

# ---- watch: component 1 runs while the servers do ----------------------------------------
while kill -0 "${client_pids[0]}" 2>/dev/null; do
    if [[ -n $server_pid ]] && ! kill -0 "$server_pid" 2>/dev/null; then
        server_rc=0
        wait "$server_pid" || server_rc=$?
        server_pid=''
        if [[ $EXIT_WHEN_IDLE == 1 && $server_rc == 0 ]]; then
            log "the servers exited 0 on their own (--exit-when-idle); waiting for component 1"
        else
            msg="a server ended (server step exit code $server_rc) while component 1 was running; see $LOG_DIR/server-*.log"
            echo "$msg" >"$LOG_DIR/SERVER_FAILED"
            log "ERROR: $msg"
            log "telling component 1: SIGTERM to its tasks"
            die 4 "job failed because a server failed"
        fi
    fi
    sleep "$WATCH_INTERVAL"
done

client_rc=0
wait "${client_pids[0]}" || client_rc=$?
log "component 1 ($MODE) exited with code $client_rc; last lines of its log:"
find "$LOG_DIR" -maxdepth 1 -name "${client_log//%[Nt]/*}" -exec tail -n 3 {} + | sed 's/^/    /'
exit "$client_rc"
