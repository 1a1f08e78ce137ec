"""``eagle3-appliance`` (also ``python -m appliance``): serve a target, or run the demo.

Heavy modules (torch, transformers, sanic) are imported inside the commands, after logging
is configured, so ``--help`` is fast and an import failure is logged.
"""

from __future__ import annotations

import logging
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
CacheOpt = Annotated[Path, typer.Option(envvar=_env("CACHE_DIR"), help="Where the built-in model is written.")]


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
) -> None:
    """Load the target and serve it until SIGINT/SIGTERM. Every option also reads EAGLE3_<NAME>."""
    configure_logging(log_level)
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
    run_server(create_app(settings, target), settings)


@app.command()
def demo(
    model: ModelOpt = BUILTIN_MODEL,
    dtype: DtypeOpt = Dtype.auto,
    device: DeviceOpt = Device.auto,
    port: Annotated[int, typer.Option(help="Port for the demo server (0 = a free one).")] = 0,
    batches: Annotated[int, typer.Option(help="How many /generate round-trips.")] = 4,
    batch_size: Annotated[int, typer.Option(help="Sequences per batch.")] = 2,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 256,
    draft_vocab: Annotated[int, typer.Option(help="Draft vocabulary size.")] = 512,
    cache_dir: CacheOpt = default_cache_dir(),
) -> None:
    """The main job on one machine: start a server, drive it with the client, check the bits."""
    configure_logging("WARNING")
    from appliance.demo import run_demo

    raise typer.Exit(
        run_demo(
            model=model,
            dtype=dtype,
            device=device,
            port=port,
            batches=batches,
            batch_size=batch_size,
            seq_len=seq_len,
            draft_vocab=draft_vocab,
            cache_dir=cache_dir,
        )
    )


@app.command()
def validate(
    url: Annotated[
        list[str], typer.Option(envvar=_env("URLS"), help="Server URL; repeat, or comma-separate in EAGLE3_URLS.")
    ],
    model: ModelOpt = BUILTIN_MODEL,
    dtype: DtypeOpt = Dtype.auto,
    device: DeviceOpt = Device.auto,
    batches: Annotated[int, typer.Option(help="How many /generate round-trips.")] = 4,
    batch_size: Annotated[int, typer.Option(help="Sequences per batch.")] = 2,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 128,
    draft_vocab: Annotated[int, typer.Option(help="Draft vocabulary size.")] = 512,
    cache_dir: CacheOpt = default_cache_dir(),
) -> None:
    """Drive running servers with the client and check every answer against a local copy of the model."""
    configure_logging("WARNING")
    from appliance.demo import run_validate

    urls = [u for item in url for u in item.split(",") if u.strip()]
    raise typer.Exit(
        run_validate(
            urls=urls,
            model=model,
            dtype=dtype,
            device=device,
            batches=batches,
            batch_size=batch_size,
            seq_len=seq_len,
            draft_vocab=draft_vocab,
            cache_dir=cache_dir,
        )
    )


def main() -> None:
    app()
