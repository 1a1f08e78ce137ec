"""The load tests' command-line options (Locust custom arguments) and the settings built from them.

Every option also reads ``LOCUST_<NAME>`` from the environment and can go in a
``locust.conf``. In distributed mode the master sends its values to the workers, so they
only need to be given to the master.
"""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass
from typing import Any

from locust import events

from eagle3_client.capture import Capture
from eagle3_loadtest._batches import PADDING_CHOICES, LengthDistribution
from eagle3_loadtest._fleet import DEFAULT_SPARE_COMMAND
from eagle3_loadtest._steps import StepPlan

__all__ = ["RunSettings", "add_options"]


@events.init_command_line_parser.add_listener
def add_options(parser: Any) -> None:
    parser.add_argument("--batch-size", type=int, default=2, env_var="LOCUST_BATCH_SIZE", help="Samples per batch.")
    parser.add_argument(
        "--seq-len",
        default="uniform:32:256",
        env_var="LOCUST_SEQ_LEN",
        help="Sample length distribution: fixed:N, uniform:LO:HI, normal:MEAN:STD or lognormal:MEDIAN:SIGMA.",
    )
    parser.add_argument(
        "--max-seq-len", type=int, default=256, env_var="LOCUST_MAX_SEQ_LEN", help="Longest sample (lengths clamp)."
    )
    parser.add_argument(
        "--padding",
        choices=PADDING_CHOICES,
        default="longest",
        env_var="LOCUST_PADDING",
        help="Pad each batch to its longest sample, or always to --max-seq-len.",
    )
    parser.add_argument(
        "--packed-sequence-size",
        type=int,
        default=0,
        env_var="LOCUST_PACKED_SEQUENCE_SIZE",
        help="Send packed rows of this many tokens (the recipe's packed_sequence_size): samples drawn from "
        "--seq-len are packed first-fit, --batch-size rows a request. Needs a server that grants packing. "
        "0: padded batches.",
    )
    parser.add_argument(
        "--prompt-fraction",
        type=float,
        default=0.25,
        env_var="LOCUST_PROMPT_FRACTION",
        help="Leading part of each sample with loss mask 0 (the prompt).",
    )
    parser.add_argument(
        "--draft-vocab", type=int, default=256, env_var="LOCUST_DRAFT_VOCAB", help="Draft vocabulary size D."
    )
    parser.add_argument(
        "--capture",
        default="eagle3",
        env_var="LOCUST_CAPTURE",
        help="What each /generate captures: eagle3 (the server's aux layers, draft-vocabulary supervision), "
        "dflash:L1,L2,... (DFlash-style: those layers, unshifted), dflash+logits:L1,L2,... (also the "
        "full-vocabulary logits, as JetSpec asks), dspark:L1,L2,... (DSpark's features and final norm), "
        "vispec or msd (a vision-language server's embeddings, last hidden state and logits; the ranks send "
        "text-only rows), eagle (EAGLE-1/2: the last hidden state and its logits). Needs a server with sessions "
        "unless eagle3.",
    )
    parser.add_argument(
        "--encoding",
        default="probs",
        env_var="LOCUST_ENCODING",
        help="Supervision encoding to ask for (probs, logits, hidden, topk:K); anything but probs needs a "
        "server that offers it through POST /session.",
    )
    parser.add_argument(
        "--think-time",
        type=float,
        default=0.0,
        env_var="LOCUST_THINK_TIME",
        help="Seconds a rank trains between two /generate calls.",
    )
    parser.add_argument(
        "--request-timeout", type=float, default=120.0, env_var="LOCUST_REQUEST_TIMEOUT", help="Seconds per request."
    )
    parser.add_argument("--seed", type=int, default=0, env_var="LOCUST_SEED", help="Seed for batches and mapping.")
    parser.add_argument(
        "--auth-token",
        default="",
        env_var="LOCUST_AUTH_TOKEN",
        is_secret=True,
        help="Bearer token for servers started with --auth-token.",
    )

    parser.add_argument(
        "--max-p95-ms",
        type=float,
        default=0.0,
        env_var="LOCUST_MAX_P95_MS",
        help="Highest acceptable p95 latency of /generate in ms (0: no limit).",
    )
    parser.add_argument(
        "--max-error-rate",
        type=float,
        default=0.0,
        env_var="LOCUST_MAX_ERROR_RATE",
        help="Highest acceptable fraction of failed /generate calls.",
    )

    parser.add_argument("--capacity-start-users", type=int, default=1, env_var="LOCUST_CAPACITY_START_USERS")
    parser.add_argument("--capacity-step-users", type=int, default=1, env_var="LOCUST_CAPACITY_STEP_USERS")
    parser.add_argument("--capacity-max-users", type=int, default=16, env_var="LOCUST_CAPACITY_MAX_USERS")
    parser.add_argument(
        "--capacity-step-time", type=float, default=20.0, env_var="LOCUST_CAPACITY_STEP_TIME", help="Seconds per step."
    )
    parser.add_argument(
        "--capacity-settle-time",
        type=float,
        default=5.0,
        env_var="LOCUST_CAPACITY_SETTLE_TIME",
        help="Seconds at the start of each step that are not judged (users registering).",
    )

    parser.add_argument(
        "--slow-read-rate",
        type=int,
        default=1 << 20,
        env_var="LOCUST_SLOW_READ_RATE",
        help="Bytes per second a slow reader reads.",
    )
    parser.add_argument(
        "--slow-read-max-time",
        type=float,
        default=5.0,
        env_var="LOCUST_SLOW_READ_MAX_TIME",
        help="Seconds after which a slow reader hangs up.",
    )
    parser.add_argument(
        "--slow-read-batch",
        type=int,
        default=8,
        env_var="LOCUST_SLOW_READ_BATCH",
        help="Batch size of a slow reader's request (padded to --max-seq-len).",
    )

    parser.add_argument(
        "--kill-restart",
        type=int,
        default=0,
        env_var="LOCUST_KILL_RESTART",
        help="Faults scenario: times to kill a spare server with SIGKILL and restart it while a fleet rank "
        "fails over to --host (0: off).",
    )
    parser.add_argument(
        "--kill-interval",
        type=float,
        default=3.0,
        env_var="LOCUST_KILL_INTERVAL",
        help="Seconds of fleet traffic before each kill and after each restart.",
    )
    parser.add_argument(
        "--spare-server-cmd",
        default=DEFAULT_SPARE_COMMAND,
        env_var="LOCUST_SPARE_SERVER_CMD",
        help="Command that starts the spare server ({port} and {python} are filled in); it must serve "
        "the same model as --host.",
    )
    parser.add_argument(
        "--stop-after-kill-restart",
        action="store_true",
        default=False,
        env_var="LOCUST_STOP_AFTER_KILL_RESTART",
        help="End the run once the --kill-restart sequence is done (-t stays the upper bound).",
    )
    parser.add_argument(
        "--spare-start-timeout",
        type=float,
        default=120.0,
        env_var="LOCUST_SPARE_START_TIMEOUT",
        help="Seconds the spare server may take to be ready.",
    )

    parser.add_argument(
        "--stream-queue",
        default="",
        env_var="LOCUST_STREAM_QUEUE",
        help="Ranks run as stream consumers of this run queue (appliance://host:port or redis://host:port/db): "
        "each leases batches through open_stream and upstream's FeatureDataLoader instead of sending /generate; "
        "their waits are the 'STREAM generate' row. Empty: off.",
    )
    parser.add_argument(
        "--stream-run-id",
        default="",
        env_var="LOCUST_STREAM_RUN_ID",
        help="The run the ranks consume: the one a producer you started serves, or (with --stream-produce) the "
        "id of the run this load test produces (default: a fresh one).",
    )
    parser.add_argument(
        "--stream-produce",
        type=int,
        default=0,
        env_var="LOCUST_STREAM_PRODUCE",
        help="Start a producer (eagle3_appliance produce, on the master) for this many batches drawn like the "
        "ranks' (--batch-size, --seq-len, --seed, --draft-vocab); it is stopped at the end and the run dropped. "
        "0: the run comes from a producer you started.",
    )
    parser.add_argument(
        "--stream-urls",
        default="",
        env_var="LOCUST_STREAM_URLS",
        help="Comma-separated appliances the producer of --stream-produce computes on (default: --host).",
    )
    parser.add_argument(
        "--stream-read-ahead",
        type=int,
        default=2,
        env_var="LOCUST_STREAM_READ_AHEAD",
        help="Samples each stream rank leases and claims ahead (open_stream's read_ahead; 0: none).",
    )
    parser.add_argument(
        "--stream-visibility-timeout",
        type=float,
        default=60.0,
        env_var="LOCUST_STREAM_VISIBILITY_TIMEOUT",
        help="Lease of a sample in the run of --stream-produce (seconds; well above a step).",
    )

    parser.add_argument(
        "--report-file",
        default="",
        env_var="LOCUST_REPORT_FILE",
        help="JSON with the custom metrics, the verdict and the capacity (default: <--csv>_eagle3.json).",
    )
    parser.add_argument(
        "--server-metrics-file",
        default="",
        env_var="LOCUST_SERVER_METRICS_FILE",
        help="Where to save the server's /metrics at the end (default: <--csv>_server_metrics.prom).",
    )


@dataclass(frozen=True)
class RunSettings:
    """The parsed, checked options; built where they are needed (a worker's change after spawn)."""

    batch_size: int
    lengths: LengthDistribution
    padding: str
    packed_sequence_size: int
    prompt_fraction: float
    draft_vocab: int
    encoding: str
    capture: Capture
    think_time: float
    request_timeout: float
    seed: int
    auth_token: str
    max_p95_ms: float
    max_error_rate: float
    slow_read_rate: int
    slow_read_max_time: float
    slow_read_batch: int
    kill_restart: int
    kill_interval: float
    stop_after_kill_restart: bool
    spare_server_cmd: str
    spare_start_timeout: float
    report_file: str
    server_metrics_file: str
    capacity: StepPlan
    stream_queue: str = ""
    stream_run_id: str = ""
    stream_produce: int = 0
    stream_urls: str = ""
    stream_read_ahead: int = 0
    stream_visibility_timeout: float = 60.0

    @classmethod
    def from_options(cls, opts: Namespace) -> RunSettings:
        """Raise ValueError with a readable message on an impossible combination."""
        if opts.think_time < 0 or opts.request_timeout <= 0:
            raise ValueError("--think-time must be >= 0 and --request-timeout > 0")
        if opts.slow_read_rate < 1 or opts.slow_read_max_time <= 0 or opts.slow_read_batch < 1:
            raise ValueError("--slow-read-rate, --slow-read-max-time and --slow-read-batch must be positive")
        if opts.packed_sequence_size < 0:
            raise ValueError("--packed-sequence-size must be >= 0 (0: padded batches)")
        if opts.kill_restart < 0 or opts.kill_interval <= 0 or opts.spare_start_timeout <= 0:
            raise ValueError("--kill-restart must be >= 0, --kill-interval and --spare-start-timeout > 0")
        stream_queue = opts.stream_queue.strip()
        if opts.stream_produce < 0 or opts.stream_read_ahead < 0 or opts.stream_visibility_timeout <= 0:
            raise ValueError("--stream-produce and --stream-read-ahead must be >= 0, --stream-visibility-timeout > 0")
        if stream_queue:
            if not stream_queue.startswith(("appliance://", "redis://")):
                raise ValueError(f"--stream-queue {stream_queue!r}: appliance://host:port or redis://host:port/db")
            if opts.stream_produce == 0 and not opts.stream_run_id:
                raise ValueError(
                    "--stream-queue needs --stream-run-id (the run your producer serves) or --stream-produce N"
                )
            if not Capture.parse(opts.capture).is_eagle3 or opts.encoding.strip() != "probs":
                raise ValueError(
                    "stream ranks consume EAGLE-3 runs in the probs encoding (--capture eagle3, --encoding probs)"
                )
            if opts.packed_sequence_size:
                raise ValueError("--packed-sequence-size is not available with --stream-queue")
        csv_prefix = getattr(opts, "csv_prefix", None)
        return cls(
            batch_size=opts.batch_size,
            lengths=LengthDistribution.parse(opts.seq_len, opts.max_seq_len),
            padding=opts.padding,
            packed_sequence_size=opts.packed_sequence_size,
            prompt_fraction=opts.prompt_fraction,
            draft_vocab=opts.draft_vocab,
            encoding=opts.encoding.strip(),
            capture=Capture.parse(opts.capture),
            think_time=opts.think_time,
            request_timeout=opts.request_timeout,
            seed=opts.seed,
            auth_token=opts.auth_token,
            max_p95_ms=opts.max_p95_ms,
            max_error_rate=opts.max_error_rate,
            slow_read_rate=opts.slow_read_rate,
            slow_read_max_time=opts.slow_read_max_time,
            slow_read_batch=opts.slow_read_batch,
            kill_restart=opts.kill_restart,
            kill_interval=opts.kill_interval,
            stop_after_kill_restart=opts.stop_after_kill_restart,
            spare_server_cmd=opts.spare_server_cmd,
            spare_start_timeout=opts.spare_start_timeout,
            report_file=opts.report_file or (f"{csv_prefix}_eagle3.json" if csv_prefix else ""),
            server_metrics_file=opts.server_metrics_file or (f"{csv_prefix}_server_metrics.prom" if csv_prefix else ""),
            capacity=StepPlan(
                start_users=opts.capacity_start_users,
                step_users=opts.capacity_step_users,
                max_users=opts.capacity_max_users,
                step_duration_s=opts.capacity_step_time,
                settle_s=opts.capacity_settle_time,
                p95_limit_ms=opts.max_p95_ms,
                max_error_rate=opts.max_error_rate,
            ),
            stream_queue=stream_queue,
            stream_run_id=opts.stream_run_id,
            stream_produce=opts.stream_produce,
            stream_urls=opts.stream_urls,
            stream_read_ahead=opts.stream_read_ahead,
            stream_visibility_timeout=opts.stream_visibility_timeout,
        )
