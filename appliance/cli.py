"""``eagle3-appliance`` (also ``python -m appliance``): serve a target, or run the demo.

Heavy modules (torch, transformers, sanic) are imported inside the commands, after logging
is configured, so ``--help`` is fast and an import failure is logged.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from appliance.settings import BUILTIN_MODEL, ENV_PREFIX, Device, Dtype, Settings, default_cache_dir

__all__ = ["app", "main"]

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


def _env(name: str) -> str:
    return ENV_PREFIX + name


def parse_aux_layer_ids(value: str | None) -> tuple[int, int, int] | None:
    """``"1,3,4"`` -> ``(1, 3, 4)``; empty means the protocol default."""
    if value is None or not value.strip():
        return None
    try:
        ids = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if len(ids) != 3 or len(set(ids)) != 3:
        raise typer.BadParameter(f"expected 3 distinct layer ids, got {value!r}")
    return ids  # type: ignore[return-value]


def exit_on_sigterm_while_loading() -> None:
    """Make SIGTERM end the process (exit 0) until Sanic installs its own handler.

    Loading a large checkpoint takes minutes, and as a container's PID 1 the process would
    otherwise ignore SIGTERM for all that time (the kernel drops signals PID 1 has no handler
    for), so ``docker stop`` would wait out its timeout and SIGKILL it. Nothing has been
    served yet, so there is nothing to drain. Sanic replaces this handler just before it
    logs "Worker ready" (it may answer a first request slightly earlier).
    """

    def stop(signum: int, frame: object) -> None:
        logging.getLogger("appliance").info("SIGTERM while loading: exiting")
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)


def _check_data_plane_options(tiers: str, ports: str, timeout: float) -> None:
    unknown = sorted({t.strip() for t in tiers.split(",") if t.strip()} - {"nccl", "gloo"})
    if unknown:
        raise typer.BadParameter(f"--data-planes takes nccl and/or gloo, got {unknown}")
    if timeout <= 0:
        raise typer.BadParameter(f"--data-plane-timeout must be positive, got {timeout}")
    low, _, high = ports.strip().partition("-")
    try:
        first, last = (int(low), int(high or low)) if ports.strip() not in ("", "0") else (1, 1)
    except ValueError:
        raise typer.BadParameter(
            f"--data-plane-ports takes a port or a range like 29600-29699, got {ports!r}"
        ) from None
    if not 1 <= first <= last <= 65535:
        raise typer.BadParameter(f"--data-plane-ports range {ports!r} must satisfy 1 <= first <= last <= 65535")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


ModelOpt = Annotated[
    str,
    typer.Option(
        envvar=_env("MODEL"),
        help=f"Causal LM to serve: a local folder or a hub id. '{BUILTIN_MODEL}' is the built-in tiny Llama.",
    ),
]
DtypeOpt = Annotated[
    Dtype, typer.Option(envvar=_env("DTYPE"), help="Model dtype; auto = bfloat16 on CUDA, float32 on CPU.")
]
DeviceOpt = Annotated[Device, typer.Option(envvar=_env("DEVICE"), help="Where the model runs; auto = cuda if visible.")]
AuxOpt = Annotated[
    str | None,
    typer.Option(
        envvar=_env("AUX_LAYER_IDS"),
        help="Three distinct decoder layers to capture, e.g. '1,15,28'. Default [1, L//2-1, L-4].",
    ),
]
TrustOpt = Annotated[
    bool, typer.Option(envvar=_env("TRUST_REMOTE_CODE"), help="Allow the model folder's own Python code.")
]
BatchesOpt = Annotated[int, typer.Option(help="How many /generate round-trips.")]
BatchSizeOpt = Annotated[int, typer.Option(help="Sequences per batch.")]
SeqLenOpt = Annotated[int, typer.Option(help="Tokens per sequence.")]
DraftVocabOpt = Annotated[int, typer.Option(help="Draft vocabulary size.")]
CacheOpt = Annotated[Path, typer.Option(envvar=_env("CACHE_DIR"), help="Where the built-in model is written.")]


EncodingOpt = Annotated[
    str | None,
    typer.Option(
        envvar=_env("ENCODING"),
        help="Supervision encoding the client asks for: probs, logits, hidden or topk:K (default probs).",
    ),
]


@app.command()
def serve(
    model: ModelOpt = BUILTIN_MODEL,
    dtype: DtypeOpt = Dtype.auto,
    device: DeviceOpt = Device.auto,
    aux_layer_ids: AuxOpt = None,
    trust_remote_code: TrustOpt = False,
    host: Annotated[str, typer.Option(envvar=_env("HOST"), help="Address to bind.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(envvar=_env("PORT"), help="HTTP port.")] = 8001,
    max_seq_len: Annotated[
        int, typer.Option(envvar=_env("MAX_SEQ_LEN"), help="Longest sequence per /generate (422 beyond).")
    ] = 8192,
    max_batch_tokens: Annotated[
        int, typer.Option(envvar=_env("MAX_BATCH_TOKENS"), help="Most tokens (batch x length) per /generate.")
    ] = 65536,
    max_body_bytes: Annotated[
        int, typer.Option(envvar=_env("MAX_BODY_BYTES"), help="Largest request body (413 beyond).")
    ] = 64 * 1024 * 1024,
    buffer_pool_mb: Annotated[
        int,
        typer.Option(
            envvar=_env("BUFFER_POOL_MB"), help="Host memory (MiB) kept for reuse by /generate answers; 0 = none."
        ),
    ] = 4096,
    microbatch_wait_ms: Annotated[
        float,
        typer.Option(
            envvar=_env("MICROBATCH_WAIT_MS"),
            min=0.0,
            help="Stack concurrent /generate requests of equal length into one forward, waiting at most this "
            "long for companions. Not bit-exact (see README, Performance). 0 = off.",
        ),
    ] = 0.0,
    microbatch_max_tokens: Annotated[
        int,
        typer.Option(envvar=_env("MICROBATCH_MAX_TOKENS"), min=1, help="Most tokens in one micro-batched forward."),
    ] = 16384,
    cache_dir: CacheOpt = default_cache_dir(),
    log_level: Annotated[str, typer.Option(envvar=_env("LOG_LEVEL"), help="Python logging level.")] = "INFO",
    data_planes: Annotated[
        str,
        typer.Option(
            envvar=_env("DATA_PLANES"),
            help="Process-group data planes to offer besides the wire (nccl needs the model on CUDA); '' = wire only.",
        ),
    ] = "nccl,gloo",
    data_plane_ports: Annotated[
        str,
        typer.Option(
            envvar=_env("DATA_PLANE_PORTS"),
            help="Rendezvous ports for per-client groups, e.g. 29600-29699; empty = the kernel picks free ports.",
        ),
    ] = "",
    data_plane_timeout: Annotated[
        float,
        typer.Option(envvar=_env("DATA_PLANE_TIMEOUT"), help="Seconds a rendezvous or one group transfer may take."),
    ] = 60.0,
    auth_token: Annotated[
        str | None,
        typer.Option(
            envvar=_env("AUTH_TOKEN"),
            help="Bearer token every endpoint but /health/live requires. Prefer the env var or a file.",
            show_default=False,
        ),
    ] = None,
    auth_token_file: Annotated[
        Path | None, typer.Option(envvar=_env("AUTH_TOKEN_FILE"), help="Read the bearer token from this file.")
    ] = None,
    lease_seconds: Annotated[
        float,
        typer.Option(envvar=_env("LEASE_SECONDS"), min=0.1, help="Drop a client session silent for this long."),
    ] = 60.0,
    max_lease_seconds: Annotated[
        float,
        typer.Option(
            envvar=_env("MAX_LEASE_SECONDS"), min=0.1, help="Longest lease a client may ask for in its session offer."
        ),
    ] = 3600.0,
    exit_when_idle: Annotated[
        bool,
        typer.Option(envvar=_env("EXIT_WHEN_IDLE"), help="Exit 0 once the last client session has left (batch jobs)."),
    ] = False,
    max_queue: Annotated[
        int,
        typer.Option(
            envvar=_env("MAX_QUEUE"), min=0, help="/generate requests that may wait (503 + Retry-After beyond)."
        ),
    ] = 64,
    request_timeout: Annotated[
        float,
        typer.Option(
            envvar=_env("REQUEST_TIMEOUT"),
            min=0.001,
            help="Most seconds a /generate may wait and compute (503 beyond).",
        ),
    ] = 600.0,
    grace_period: Annotated[
        float,
        typer.Option(envvar=_env("GRACE_PERIOD"), min=0, help="SIGTERM: seconds to finish in-flight requests."),
    ] = 30.0,
    gpu_poll_interval: Annotated[
        float,
        typer.Option(envvar=_env("GPU_POLL_INTERVAL"), min=0.05, help="Seconds between NVML readings."),
    ] = 5.0,
) -> None:
    """Load the target and serve it until SIGINT/SIGTERM. Every option also reads EAGLE3_<NAME>."""
    exit_on_sigterm_while_loading()
    configure_logging(log_level)
    _check_data_plane_options(data_planes, data_plane_ports, data_plane_timeout)
    from appliance.auth import load_token

    try:
        token = load_token(auth_token, auth_token_file)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    settings = Settings(
        model=model,
        dtype=dtype,
        device=device,
        aux_layer_ids=parse_aux_layer_ids(aux_layer_ids),
        trust_remote_code=trust_remote_code,
        host=host,
        port=port,
        max_seq_len=max_seq_len,
        max_batch_tokens=max_batch_tokens,
        max_body_bytes=max_body_bytes,
        buffer_pool_mb=buffer_pool_mb,
        microbatch_wait_ms=microbatch_wait_ms,
        microbatch_max_tokens=microbatch_max_tokens,
        cache_dir=cache_dir,
        log_level=log_level,
        data_planes=data_planes,
        data_plane_ports=data_plane_ports,
        data_plane_timeout=data_plane_timeout,
        auth_token=token,
        lease_seconds=lease_seconds,
        max_lease_seconds=max_lease_seconds,
        exit_when_idle=exit_when_idle,
        max_queue=max_queue,
        request_timeout=request_timeout,
        grace_period=grace_period,
        gpu_poll_interval=gpu_poll_interval,
    )
    from transformers.utils import logging as hf_logging

    from appliance.server import create_app, run_server
    from appliance.target import load_target

    hf_logging.disable_progress_bar()
    try:
        target = load_target(settings)
    except ValueError as exc:  # bad aux layer ids, unsupported layout: a user error, not a crash
        raise typer.BadParameter(str(exc)) from None
    logging.getLogger("appliance").info("serving %s on %s:%d", target.model_info(), host, port)
    raise typer.Exit(run_server(create_app(settings, target), settings))


@app.command()
def gpus(
    url: Annotated[
        str | None, typer.Option(help="Ask a running server's GET /gpus instead of this machine's NVML.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON of GET /gpus instead of a table.")] = False,
) -> None:
    """GPU health from NVML: memory, utilisation, temperature, power, throttling, ECC, row remap, XIDs."""
    import json

    from appliance.gpu import GpuReport, format_table, read_report, report_from_json

    report: GpuReport
    if url is None:
        report = read_report()
    else:
        report = report_from_json(_get_gpus(url))
    typer.echo(json.dumps(report.to_json(), indent=2) if as_json else format_table(report))
    raise typer.Exit(1 if report.fatal_reasons() else 0)


def _get_gpus(url: str) -> dict:
    import httpx

    from client.auth import auth_headers, resolve_token
    from client.protocol import EP_GPUS, path

    try:
        resp = httpx.get(url.rstrip("/") + path(EP_GPUS), headers=auth_headers(resolve_token(None)), trust_env=False)
    except httpx.HTTPError as exc:
        raise typer.BadParameter(f"cannot reach {url}: {exc}") from None
    if resp.status_code != 200:
        raise typer.BadParameter(f"{url}{path(EP_GPUS)} answered HTTP {resp.status_code}: {resp.text[:200]}")
    return resp.json()


@app.command()
def demo(
    model: ModelOpt = BUILTIN_MODEL,
    dtype: DtypeOpt = Dtype.auto,
    device: DeviceOpt = Device.auto,
    port: Annotated[int, typer.Option(help="Port for the demo server (0 = a free one).")] = 0,
    batches: BatchesOpt = 4,
    batch_size: BatchSizeOpt = 2,
    seq_len: SeqLenOpt = 256,
    draft_vocab: DraftVocabOpt = 512,
    cache_dir: CacheOpt = default_cache_dir(),
    encoding: EncodingOpt = None,
) -> None:
    """The main job on one machine: start a server, drive it with the client, check the bits."""
    configure_logging("WARNING")
    from appliance.demo import DriveSpec, run_demo

    spec = DriveSpec(model, dtype, device, batches, batch_size, seq_len, draft_vocab, cache_dir, encoding)
    raise typer.Exit(run_demo(spec, port=port))


@app.command()
def validate(
    url: Annotated[
        list[str], typer.Option(envvar=_env("URLS"), help="Server URL; repeat, or comma-separate in EAGLE3_URLS.")
    ],
    model: ModelOpt = BUILTIN_MODEL,
    dtype: DtypeOpt = Dtype.auto,
    device: DeviceOpt = Device.auto,
    batches: BatchesOpt = 4,
    batch_size: BatchSizeOpt = 2,
    seq_len: SeqLenOpt = 128,
    draft_vocab: DraftVocabOpt = 512,
    cache_dir: CacheOpt = default_cache_dir(),
    encoding: EncodingOpt = None,
) -> None:
    """Drive running servers with the client and check every answer against a local copy of the model."""
    configure_logging("WARNING")
    from appliance.demo import DriveSpec, run_validate

    urls = [u for item in url for u in item.split(",") if u.strip()]
    spec = DriveSpec(model, dtype, device, batches, batch_size, seq_len, draft_vocab, cache_dir, encoding)
    raise typer.Exit(run_validate(spec, urls))


@app.command()
def sizes(
    model: Annotated[
        list[str],
        typer.Option(help="A preset (llama-3.1-8b, qwen3-8b, llama-3.1-70b) or a folder with config.json; repeatable."),
    ],
    draft_vocab: Annotated[int, typer.Option(help="Draft vocabulary size D.")] = 32768,
    dtype: Annotated[Dtype, typer.Option(help="Model dtype on the wire (auto = bfloat16, as on a GPU).")] = Dtype.auto,
    encoding: Annotated[
        list[str] | None, typer.Option(help="Encodings to list (repeatable); default probs, logits, hidden, topk:64.")
    ] = None,
    batch_tokens: Annotated[int, typer.Option(help="Tokens per batch for the per-batch column.")] = 2048,
    markdown: Annotated[bool, typer.Option(help="Print a Markdown table.")] = False,
) -> None:
    """Bytes per token and per batch of a /generate answer for each supervision encoding (no download)."""
    import torch

    from appliance.sizes import load_shape, render_table, size_rows

    dtype_bytes = (torch.bfloat16 if dtype is Dtype.auto else getattr(torch, dtype.value)).itemsize
    names = encoding or ["probs", "logits", "hidden", "topk:64"]
    try:
        rows = [
            row
            for name in model
            for row in size_rows(
                load_shape(name),
                draft_vocab=draft_vocab,
                dtype_bytes=dtype_bytes,
                encodings=names,
                batch_tokens=batch_tokens,
            )
        ]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(render_table(rows, markdown=markdown))
    typer.echo(
        f"\nper token: aux_hidden_states 3H x {dtype_bytes} B + payload + position_mask 1 B + input_ids 8 B + "
        "loss_mask 8 B (int64, as clients send them); each answer adds a few hundred bytes of headers."
    )
    for name in model:
        shape = load_shape(name)
        rows_bytes = draft_vocab * shape.hidden_size * dtype_bytes
        typer.echo(
            f"hidden on {shape.name}: the client fetches the LM-head rows once per vocab mapping: {rows_bytes:,} B"
        )


def main() -> None:
    app()
