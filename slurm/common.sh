# shellcheck shell=bash
# Functions shared by slurm/hetjob.sh and slurm/serve.sh (sourced, never run).
#
# The two job scripts start appliance servers as one Slurm step (one task per server), wait
# until every server answers, and stop them again with SIGTERM. Everything that decides
# *what* runs lives in the job scripts; this file only knows *how* to run it under Slurm.

# --- messages -----------------------------------------------------------------------------

log() { printf '[eagle3 %(%H:%M:%S)T] %s\n' -1 "$*"; }

# die CODE MESSAGE: print a clear error and end the script with CODE (the EXIT trap cleans up).
die() {
    local code=$1
    shift
    log "ERROR: $*" >&2
    exit "$code"
}

# --- settings -----------------------------------------------------------------------------

# load_env_file FILE: read KEY=value lines into the environment. A variable that is already
# set (exported at submission, e.g. `MODE=train sbatch ...`) wins over the file, so the
# file holds the site defaults and the command line the exceptions.
load_env_file() {
    local file=$1 line name
    [[ -r $file ]] || die 2 "env file $file is not readable"
    while IFS= read -r line || [[ -n $line ]]; do
        [[ $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)= ]] || continue
        name=${BASH_REMATCH[2]}
        [[ -n ${!name+set} ]] && continue
        eval "export $name=${line#"${BASH_REMATCH[0]}"}"
    done <"$file"
    log "settings read from $file"
}

# container_opts IMAGE MOUNTS: the pyxis options for srun, one per line; none without an image.
container_opts() {
    if [[ -n ${1:-} ]]; then echo "--container-image=$1"; fi
    if [[ -n ${1:-} && -n ${2:-} ]]; then echo "--container-mounts=$2"; fi
}

# --- what runs inside a step (serialized into `bash -c`, so no shared file is needed) ------

# server_task BASE_PORT GPUS_PER_SERVER CMD...: one task of the server step = one appliance on
# GPUS_PER_SERVER GPUs (more than one: a tensor-parallel appliance, `serve --tensor-parallel-size`).
# Task i on a node listens on BASE_PORT+i and sees only GPUs i*G .. i*G+G-1 of that node.
server_task() {
    local port=$(($1 + SLURM_LOCALID)) per=$2
    shift 2
    # Indices into the GPUs already visible to the task (CUDA_VISIBLE_DEVICES, set by Slurm or
    # the site) when there is such a list; else the node's own GPU ids, when it has GPUs at all.
    local gpus=() mine=() k i
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"; fi
    if ((${#gpus[@]})) || command -v nvidia-smi >/dev/null 2>&1; then
        for ((k = 0; k < per; k++)); do
            i=$((SLURM_LOCALID * per + k))
            if ((${#gpus[@]})); then i=${gpus[i % ${#gpus[@]}]}; fi
            mine+=("$i")
        done
        CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${mine[*]}")
        export CUDA_VISIBLE_DEVICES
    fi
    echo "server task $SLURM_PROCID on node $SLURMD_NODENAME ($(hostname)): port $port," \
        "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-none}, pid $$"
    exec "$@" --port "$port"
}

# servers_per_node TASKS_PER_NODE TENSOR_PARALLEL_SIZE: appliances per node when each takes
# TENSOR_PARALLEL_SIZE GPUs and the node has one task slot per GPU.
servers_per_node() {
    [[ $2 =~ ^[1-9][0-9]*$ ]] || die 2 "TENSOR_PARALLEL_SIZE=$2: expected a positive integer"
    (($1 % $2 == 0)) || die 2 "$1 GPU(s) per node do not split into servers of TENSOR_PARALLEL_SIZE=$2 GPUs"
    echo $(($1 / $2))
}

# client_task COMPONENT CMD...: print where this task runs, then become CMD.
client_task() {
    echo "component $1 task $SLURM_PROCID on node $SLURMD_NODENAME ($(hostname))"
    shift
    exec "$@"
}

# task_script FUNCTION: a `bash -c` script that runs FUNCTION "$@" on the compute node. The
# function's source travels in the command line, so no shared file (or container mount) is
# needed:  srun ... bash -c "$(task_script f)" f ARGS...
task_script() {
    printf '%s\n%s "$@"\n' "$(declare -f "$1")" "$1"
}

# --- server lifecycle ---------------------------------------------------------------------

# server_urls NODELIST PER_NODE BASE_PORT [HOST_OVERRIDE]: one URL per server, node-major,
# in the order of the step's task ranks.
server_urls() {
    local node host i
    for node in $(scontrol show hostnames "$1"); do
        host=${4:-$node}
        for ((i = 0; i < $2; i++)); do
            echo "http://$host:$(($3 + i))"
        done
    done
}

# http_status URL: the HTTP status code, 000 when nothing answers. Proxies are bypassed:
# the servers are peers inside the cluster.
http_status() {
    curl --noproxy '*' -s -o /dev/null -w '%{http_code}' --max-time 5 "$1" || true
}

# server_ready URL: 200 on /health/ready, or on /health where that route does not exist. No
# token is sent: the appliance answers its probes without one even when it requires a token
# (EAGLE3_AUTH_TOKEN_FILE) for everything else.
server_ready() {
    local code
    code=$(http_status "$1/health/ready")
    [[ $code == 404 ]] && code=$(http_status "$1/health")
    [[ $code == 200 ]]
}

# wait_until_ready STEP_PID TIMEOUT URL...: poll until every server is ready. Fails fast with
# exit code 3 when the server step ends first (a crash at load time) or the timeout passes.
wait_until_ready() {
    local pid=$1 timeout=$2
    shift 2
    local pending=("$@") waiting url start=$SECONDS
    while ((${#pending[@]})); do
        kill -0 "$pid" 2>/dev/null ||
            die 3 "the server step ended before every server was ready; see $LOG_DIR/server-*.log"
        ((SECONDS - start < timeout)) ||
            die 3 "servers not ready after ${timeout}s: ${pending[*]}; see $LOG_DIR/server-*.log"
        waiting=()
        for url in "${pending[@]}"; do
            server_ready "$url" || waiting+=("$url")
        done
        pending=("${waiting[@]}")
        ((${#pending[@]})) && sleep 2
    done
    log "all $# server(s) ready after $((SECONDS - start))s"
}

# step_ids NAME: the ids of this job's running steps called NAME (srun --job-name). Each
# component of a heterogeneous job has its own job id, and so its own steps.
step_ids() {
    local jobs=$SLURM_JOB_ID var
    for var in $(compgen -v SLURM_JOB_ID_HET_GROUP_); do jobs+=,${!var}; done
    squeue -h -s -j "$jobs" -o '%i|%j' 2>/dev/null | awk -F'|' -v n="$1" '$2 == n { print $1 }'
}

# stop_step PID NAME TIMEOUT: SIGTERM the tasks of the step (graceful shutdown; signalling
# srun itself would SIGKILL them), wait up to TIMEOUT seconds, then kill. The step's exit
# code is logged (this must run in the shell that started srun: only that shell can `wait`).
stop_step() {
    local pid=$1 name=$2 timeout=$3 id rc=0 start=$SECONDS
    if kill -0 "$pid" 2>/dev/null; then
        for id in $(step_ids "$name"); do
            scancel --signal=TERM "$id" 2>/dev/null || true
        done
        while kill -0 "$pid" 2>/dev/null && ((SECONDS - start < timeout)); do
            sleep 1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "step $name still running after ${timeout}s: killing it"
            kill -TERM "$pid" 2>/dev/null || true # srun answers SIGTERM with SIGKILL to its tasks
        fi
    fi
    wait "$pid" 2>/dev/null || rc=$?
    log "step $name ended, exit code $rc"
}

# --- the elastic server list (a trainer's EAGLE3_SERVER_LIST) ------------------------------

# server_list_update FILE add|remove URL...: add URLs to (or remove them from) a server-list
# file that trainers follow (one URL per line; the client re-reads it when it changes). Several
# jobs can share one file: every update holds FILE.lock (flock) and replaces FILE atomically,
# so a trainer never reads half of it. Comments and blank lines are dropped.
server_list_update() {
    local file=$1 action=$2
    shift 2
    [[ $action == add || $action == remove ]] || die 2 "server_list_update: unknown action $action"
    mkdir -p "$(dirname "$file")"
    (
        flock -w 60 9 || die 2 "could not lock $file.lock within 60 s"
        local -A given=() seen=()
        local -a kept=()
        local url line
        for url in "$@"; do given[$url]=1; done
        if [[ -r $file ]]; then
            while IFS= read -r line || [[ -n $line ]]; do
                line=${line%%#*}
                line=${line//[[:space:]]/}
                [[ -z $line || -n ${seen[$line]:-} ]] && continue
                [[ $action == remove && -n ${given[$line]:-} ]] && continue
                seen[$line]=1
                kept+=("$line")
            done <"$file"
        fi
        if [[ $action == add ]]; then
            for url in "$@"; do
                [[ -n ${seen[$url]:-} ]] || kept+=("$url")
                seen[$url]=1
            done
        fi
        if ((${#kept[@]})); then printf '%s\n' "${kept[@]}" >"$file.tmp.$$"; else : >"$file.tmp.$$"; fi
        mv "$file.tmp.$$" "$file"
    ) 9>"$file.lock"
}
