#!/usr/bin/env bash
# CI: run slurm/hetjob.sh and slurm/serve.sh under real Slurm daemons: two logical nodes
# (n0, n1) on this one machine, Slurm from Debian, all state in a temporary folder.
#
# Checks, each printed as it passes:
#   1. shellcheck on slurm/*.sh and this script
#   2. hetjob, MODE=validate, 2 servers on one node: exit 0, components on different nodes,
#      every answer bit-exact, servers stopped with SIGTERM
#   3. hetjob, component 1 fails (exit 7): the job fails with 7, servers stopped
#   4. hetjob, a server cannot start (bad model): the job exits 3 before component 1 starts
#   5. hetjob, a server is killed while component 1 runs: component 1 gets SIGTERM, job exits 4
#   6. serve.sh: servers become ready (and join a shared server list), validate from outside
#      the job, scancel removes them from the list and stops them
#   7. hetjob, MODE=locust: one master and two workers on component 1 run loadtest/'s steady
#      scenario against the servers (every answer validated; zero failures required)
#   8. hetjob with a token file (EAGLE3_AUTH_TOKEN_FILE): the servers turn ready through the
#      token-less probes, refuse a request without the token (401) and validate bit-exact with it
# Every daemon started here is stopped by its pid on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
T0=$SECONDS
WORK=$(mktemp -d /tmp/eagle3-slurm-ci.XXXXXX)
JOBS=$WORK/jobs # submit dir: driver logs land here
LOGS=$WORK/logs # LOG_ROOT of the job scripts
DAEMON_PIDS=() # started here, stopped in reverse order on exit
JOB_IDS=()
HOSTS_LINE="127.0.0.1 n0 n1 # eagle3 slurm CI"

say() { printf '== slurm [%3ds]: %s\n' "$((SECONDS - T0))" "$*"; }
ok() { say "ok: $*"; }

# fail MESSAGE [JOB_ID]: print the message and the job's logs, then stop (the trap cleans up).
fail() {
    say "FAILED: $1"
    if [[ -n ${2:-} ]]; then
        for f in "$JOBS"/*-"$2".out "$LOGS/$2"/*; do
            [[ -f $f ]] && { echo "---- $f"; tail -n 40 "$f"; }
        done
    fi
    exit 1
}

# stop_pid PID NAME: SIGTERM, wait up to 15 s, then SIGKILL.
stop_pid() {
    local i
    kill -0 "$1" 2>/dev/null || return 0
    kill -TERM "$1" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        kill -0 "$1" 2>/dev/null || { say "stopped $2 (pid $1)"; return 0; }
        sleep 0.1
    done
    kill -KILL "$1" 2>/dev/null || true
    say "killed $2 (pid $1)"
}

# pid_of FILE NAME: the pid a daemon wrote (daemons write the file just after forking).
pid_of() {
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -s $1 ]] && { cat "$1"; return 0; }
        sleep 0.1
    done
    fail "$2 wrote no pid file $1"
}

# free_base_port: the first of two consecutive ports on which nothing listens (others may be
# running servers on this machine).
free_base_port() {
    local p
    for ((p = 29301; p < 29400; p += 2)); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && ! (exec 3<>"/dev/tcp/127.0.0.1/$((p + 1))") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    fail "no free port pair in 29301-29400"
}

teardown() {
    local rc=$? i
    set +e
    if ((${#JOB_IDS[@]})) && [[ -n $(squeue -h 2>/dev/null) ]]; then
        scancel "${JOB_IDS[@]}" 2>/dev/null
        for ((i = 0; i < 60; i++)); do [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 1; done
    fi
    for ((i = ${#DAEMON_PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${DAEMON_PIDS[i]%%:*}" "${DAEMON_PIDS[i]#*:}"
    done
    if grep -qxF "$HOSTS_LINE" /etc/hosts; then
        grep -vxF "$HOSTS_LINE" /etc/hosts >"$WORK/hosts" && cat "$WORK/hosts" >/etc/hosts
    fi
    say "step took $((SECONDS - T0)) s; exit code $rc"
    exit "$rc"
}
trap teardown EXIT

# ---- install -----------------------------------------------------------------------------
missing=()
command -v slurmctld >/dev/null || missing+=(slurm-wlm)
command -v munged >/dev/null || missing+=(munge)
command -v shellcheck >/dev/null || missing+=(shellcheck)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[[ -x .venv/bin/eagle3-appliance ]] || make -s .venv/.installed
say "Slurm $(dpkg-query -W -f='${Version}' slurmctld), shellcheck $(dpkg-query -W -f='${Version}' shellcheck)"

# ---- 1. shellcheck -----------------------------------------------------------------------
shellcheck -x slurm/*.sh .ci/slurm.sh || fail "shellcheck"
ok "shellcheck slurm/*.sh .ci/slurm.sh"

# ---- a two-node cluster on this machine ---------------------------------------------------
for port in 6817 6818 17101 17102; do # slurmctld, slurmd (unused), n0, n1
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then fail "port $port is taken: is a Slurm already running?"; fi
done
host=$(hostname -s)
mkdir -p "$JOBS" "$LOGS" "$WORK"/{state,spool/n0,spool/n1,log,run}
export SLURM_CONF=$WORK/slurm.conf # every Slurm daemon and command (and the jobs) read it
cat >"$SLURM_CONF" <<EOF
ClusterName=eagle3ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,bf_resolution=1,bf_hetjob_immediate
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool/%n
SlurmctldPidFile=$WORK/run/slurmctld.pid
SlurmdPidFile=$WORK/run/slurmd-%n.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd-%n.log
MailProg=/bin/true
# sbatch --wait polls every 2 s while that is under MinJobAge/2, and backs off up to 32 s
# otherwise: a short MinJobAge keeps each CI job from idling half a minute after it ends.
MinJobAge=4
NodeName=n0 NodeHostname=$host NodeAddr=127.0.0.1 Port=17101 CPUs=2 RealMemory=8000 State=UNKNOWN
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17102 CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=n0,n1 Default=YES MaxTime=INFINITE State=UP
EOF
# The logical node names must resolve to this machine for the servers' URLs.
if ! getent hosts n0 >/dev/null || ! getent hosts n1 >/dev/null; then echo "$HOSTS_LINE" >>/etc/hosts; fi

if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already running: using it"
else
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    [[ -f /etc/munge/munge.key ]] || mungekey --create --keyfile /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged
    for ((i = 0; i < 50; i++)); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    DAEMON_PIDS+=("$(pid_of /run/munge/munged.pid munged):munged")
fi
/usr/sbin/slurmctld
DAEMON_PIDS+=("$(pid_of "$WORK/run/slurmctld.pid" slurmctld):slurmctld")
for node in n0 n1; do
    /usr/sbin/slurmd -N "$node"
    DAEMON_PIDS+=("$(pid_of "$WORK/run/slurmd-$node.pid" slurmd):slurmd $node")
done
for ((i = 0; i < 60; i++)); do
    [[ $(sinfo -h -o %t 2>/dev/null | sort -u) == idle ]] && break
    sleep 0.5
done
[[ $(sinfo -h -o %t | sort -u) == idle ]] || fail "nodes not idle: $(sinfo)"
say "cluster up: $(sinfo -h -o '%P %D nodes %N %t')"

# ---- helpers for the jobs ----------------------------------------------------------------
# What a CPU-only cluster needs instead of the scripts' GPU defaults (options before the
# script name apply to every component; ':' starts the next component's).
CPU=(--partition=debug --time=00:10:00 --cpus-per-task=1 --gpus-per-node=0)
BASE_PORT=$(free_base_port)
export PYTHON_ENV=$REPO/.venv LOG_ROOT=$LOGS BASE_PORT EAGLE3_CACHE_DIR=$WORK/cache
export STOP_TIMEOUT=30 WATCH_INTERVAL=1 READY_TIMEOUT=300 HF_HUB_OFFLINE=1

# submit_wait VAR SBATCH_ARG...: `sbatch --wait`; VAR gets the job id, JOB_RC the exit code.
submit_wait() {
    local -n _id=$1
    shift
    local out
    JOB_RC=0
    out=$(cd "$JOBS" && sbatch --wait --parsable "$@") || JOB_RC=$?
    _id=${out%%;*}
    JOB_IDS+=("$_id")
    say "job $_id: sbatch --wait $* -> exit code $JOB_RC"
}

# nodes_in LOG...: the node names that step logs report ("... on node nX ...").
nodes_in() { grep -ho 'on node [^ ]*' "$@" | cut -d' ' -f3 | sort -u | paste -sd,; }

# servers_stopped JOB: the driver log shows a clean SIGTERM stop, every server process is
# gone and every port is closed.
servers_stopped() {
    local job=$1 pid url
    grep -q 'step eagle3-servers ended, exit code 0' "$JOBS"/*-"$job".out || return 1
    while read -r pid; do
        ! kill -0 "$pid" 2>/dev/null || return 1
    done < <(grep -ho 'pid [0-9]*' "$LOGS/$job"/server-*.log | cut -d' ' -f2)
    while read -r url; do
        [[ $(curl --noproxy '*' -s -o /dev/null -w '%{http_code}' "$url/health" || true) == 000 ]] || return 1
    done <"$LOGS/$job/urls.txt"
}

# ---- 2. hetjob, validate: two servers on component 0, the client on component 1 ----------
submit_wait job "${CPU[@]}" --ntasks-per-node=2 : "${CPU[@]}" --ntasks-per-node=1 "$REPO/slurm/hetjob.sh"
((JOB_RC == 0)) || fail "validate job exit code $JOB_RC (expected 0)" "$job"
ok "validate job exit code 0"
server_nodes=$(nodes_in "$LOGS/$job"/server-*.log)
client_nodes=$(nodes_in "$LOGS/$job/validate.log")
say "placement: servers on $server_nodes ($(grep -c . "$LOGS/$job/urls.txt") URLs: $(paste -sd' ' "$LOGS/$job/urls.txt")), validation client on $client_nodes"
[[ -n $server_nodes && -n $client_nodes && $server_nodes != *"$client_nodes"* ]] ||
    fail "components not on different nodes" "$job"
ok "component 0 on $server_nodes, component 1 on $client_nodes"
grep -E '^(batch|result)' "$LOGS/$job/validate.log" | sed 's/^/    /'
if ! grep -q '^result  PASS' "$LOGS/$job/validate.log" || grep -q 'bit-exact=NO' "$LOGS/$job/validate.log"; then
    fail "validation not bit-exact" "$job"
fi
ok "validation bit-exact against 2 servers"
servers_stopped "$job" || fail "servers not stopped cleanly" "$job"
ok "servers stopped (SIGTERM, step exit code 0, processes gone, ports closed)"

# ---- 3. hetjob, component 1 fails --------------------------------------------------------
MODE=train TRAIN_CMD='echo "trainer: failing on purpose"; exit 7' \
    submit_wait job "${CPU[@]}" --ntasks-per-node=1 "$REPO/slurm/hetjob.sh"
((JOB_RC == 7)) || fail "failing job exit code $JOB_RC (expected 7)" "$job"
grep -q 'failing on purpose' "$LOGS/$job"/train-*.log || fail "trainer did not run" "$job"
ok "component 1 failed with 7 -> the job failed with 7"
servers_stopped "$job" || fail "servers not stopped after the failure" "$job"
ok "servers stopped after the failure"

# ---- 4. hetjob, a server cannot start: the job fails at once, component 1 never runs -------
MODEL=/nonexistent/model submit_wait job "${CPU[@]}" --ntasks-per-node=1 "$REPO/slurm/hetjob.sh"
((JOB_RC == 3)) || fail "bad-model job exit code $JOB_RC (expected 3)" "$job"
grep -h 'ERROR' "$JOBS/eagle3-$job.out" | sed 's/^/    /'
grep -q 'server step ended before every server was ready' "$JOBS/eagle3-$job.out" || fail "no clear message" "$job"
! grep -q 'component 1 started' "$JOBS/eagle3-$job.out" || fail "component 1 started without servers" "$job"
ok "a server that cannot start fails the job with 3 before component 1 starts"

# ---- 5. hetjob, a server dies while component 1 runs -------------------------------------
(
    export MODE=train TRAIN_CMD='trap "echo trainer: got SIGTERM; kill \$!; exit 143" TERM; echo trainer: running; sleep 600 & wait'
    cd "$JOBS" && exec sbatch --wait --parsable --job-name=eagle3-crash "${CPU[@]}" --ntasks-per-node=1 "$REPO/slurm/hetjob.sh" >/dev/null
) &
waiter=$!
job=''
for ((i = 0; i < 300; i++)); do
    job=$(squeue -h --name=eagle3-crash -o %i 2>/dev/null | head -n1 | cut -d+ -f1)
    [[ -n $job ]] && grep -qs 'trainer: running' "$LOGS/$job"/train-*.log && break
    sleep 0.5
done
[[ -n $job ]] && JOB_IDS+=("$job")
grep -qs 'trainer: running' "$LOGS/$job"/train-*.log || fail "the server-crash job did not start its trainer" "$job"
pid=$(grep -ho 'pid [0-9]*' "$LOGS/$job"/server-*.log | cut -d' ' -f2)
say "job $job: trainer running; killing the server (pid $pid) with SIGKILL"
kill -KILL "$pid"
t_kill=$SECONDS
JOB_RC=0
wait "$waiter" || JOB_RC=$?
say "job $job: sbatch --wait returned $((SECONDS - t_kill)) s after the kill, exit code $JOB_RC"
((JOB_RC == 4)) || fail "server-crash job exit code $JOB_RC (expected 4)" "$job"
grep -h 'trainer:' "$LOGS/$job"/train-*.log | sed 's/^/    /'
grep -q 'trainer: got SIGTERM' "$LOGS/$job"/train-*.log || fail "component 1 was not told" "$job"
grep -h 'ERROR' "$JOBS/eagle3-$job.out" | sed 's/^/    /'
[[ -f $LOGS/$job/SERVER_FAILED ]] || fail "no SERVER_FAILED marker" "$job"
ok "server death: component 1 got SIGTERM, the job failed with 4"

# ---- 6. serve.sh: a standalone server job, stopped with scancel ---------------------------
fleet_list=$WORK/fleet/servers.txt
mkdir -p "$WORK/fleet" && echo 'http://other-job:8001' >"$fleet_list" # another job's server, kept throughout
job=$(cd "$JOBS" && SERVER_LIST=$fleet_list DRAIN_SECONDS=1 sbatch --parsable "${CPU[@]}" --ntasks-per-node=2 "$REPO/slurm/serve.sh")
JOB_IDS+=("$job")
say "job $job: sbatch slurm/serve.sh"
for ((i = 0; i < 600; i++)); do
    [[ -f $LOGS/$job/urls.txt || -z $(squeue -h -j "$job" 2>/dev/null) ]] && break
    sleep 0.5
done
[[ -f $LOGS/$job/urls.txt ]] || fail "serve.sh published no URLs" "$job"
urls=$(paste -sd, "$LOGS/$job/urls.txt")
say "serve.sh ready: $urls; validating from outside the job"
.venv/bin/eagle3-appliance validate --url "$urls" --model builtin --batches 2 >"$WORK/serve-validate.log" ||
    fail "validation against serve.sh servers failed: $(cat "$WORK/serve-validate.log")" "$job"
grep -E '^result' "$WORK/serve-validate.log" | sed 's/^/    /'
ok "serve.sh servers bit-exact"
[[ $(paste -sd, "$fleet_list") == "http://other-job:8001,$urls" ]] ||
    fail "serve.sh did not add its servers to SERVER_LIST: $(paste -sd, "$fleet_list")" "$job"
ok "serve.sh added its servers to the shared server list"
# --batch --signal=TERM: only the job script is told; it stops its servers gracefully.
scancel --batch --signal=TERM "$job"
for ((i = 0; i < 120; i++)); do [[ -z $(squeue -h -j "$job" 2>/dev/null) ]] && break; sleep 0.5; done
[[ -z $(squeue -h -j "$job" 2>/dev/null) ]] || fail "serve.sh job still running after scancel" "$job"
servers_stopped "$job" || fail "serve.sh servers not stopped cleanly" "$job"
ok "scancel stopped serve.sh's servers cleanly"
[[ $(paste -sd, "$fleet_list") == "http://other-job:8001" ]] ||
    fail "serve.sh left its servers in SERVER_LIST: $(paste -sd, "$fleet_list")" "$job"
ok "serve.sh removed its servers from the shared list before stopping them"

# ---- 7. hetjob, MODE=locust: distributed Locust on component 1 ----------------------------
# The real steady scenario from loadtest/: every answer is validated by the Locust users.
MODE=locust LOCUST_FILE=$REPO/loadtest LOCUST_USERS=2 LOCUST_SPAWN_RATE=2 LOCUST_RUN_TIME=8s \
    LOCUST_ARGS="--tags steady --batch-size 1 --seq-len uniform:16:64 --draft-vocab 128" \
    submit_wait job "${CPU[@]}" --ntasks-per-node=1 : "${CPU[@]}" --ntasks-per-node=2 "$REPO/slurm/hetjob.sh"
((JOB_RC == 0)) || fail "locust job exit code $JOB_RC (expected 0)" "$job"
workers=$(grep -l 'Got quit message from master' "$LOGS/$job"/locust-worker-*.log | wc -l)
say "locust: master on $(nodes_in "$LOGS/$job/locust-master.log"), $workers worker(s) on $(nodes_in "$LOGS/$job"/locust-worker-*.log)"
read -r requests failures < <(awk -F, '$2 == "generate" { print $3, $4 }' "$LOGS/$job/locust_stats.csv")
say "locust: ${requests:-0} validated /generate requests, ${failures:-?} failures"
((workers == 2)) || fail "expected 2 locust workers" "$job"
((${requests:-0} > 0 && ${failures:-1} == 0)) || fail "locust sent no /generate or had failures" "$job"
servers_stopped "$job" || fail "servers not stopped after locust" "$job"
ok "locust mode: steady scenario, master + 2 workers, exit code 0, servers stopped"

# ---- 8. hetjob with a token file: probes need none, everything else does ------------------
token_file=$WORK/eagle3-token
(umask 077 && head -c 24 /dev/urandom | base64 >"$token_file")
# The trainer: a request without the token must be refused, then our client (which reads
# EAGLE3_AUTH_TOKEN_FILE, as the servers do) validates every server bit-exact.
# shellcheck disable=SC2016  # expanded by the trainer's shell on the compute node
token_cmd='url=${EAGLE3_TARGET_URLS%%,*}
code=$(curl --noproxy "*" -s -o /dev/null -w "%{http_code}" -X POST "$url/model_info")
echo "trainer: POST /model_info without the token: $code"
[[ $code == 401 ]] || exit 9
exec "$PYTHON_ENV/bin/eagle3-appliance" validate --url "$EAGLE3_TARGET_URLS" --model builtin --batches 2'
EAGLE3_AUTH_TOKEN_FILE=$token_file MODE=train TRAIN_CMD=$token_cmd \
    submit_wait job "${CPU[@]}" --ntasks-per-node=1 "$REPO/slurm/hetjob.sh"
((JOB_RC == 0)) || fail "token-file job exit code $JOB_RC (expected 0)" "$job"
grep -h -e '^trainer:' -e '^result' "$LOGS/$job"/train-*.log | sed 's/^/    /'
grep -q 'without the token: 401' "$LOGS/$job"/train-*.log || fail "a request without the token was not refused" "$job"
grep -q '^result  PASS' "$LOGS/$job"/train-*.log || fail "validation with the token file failed" "$job"
servers_stopped "$job" || fail "servers not stopped after the token-file job" "$job"
ok "token file: servers ready through token-less probes, 401 without the token, bit-exact with it, stopped"

say "all checks passed"
