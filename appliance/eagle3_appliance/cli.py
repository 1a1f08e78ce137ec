"""``eagle3-appliance`` (also ``python -m eagle3_appliance``): serve a target, or run the demo.

The ``serve`` command's options are generated from the declarations in
:mod:`eagle3_appliance.settings` (each with its ``EAGLE3_<NAME>`` environment variable), and
``demo``/``validate`` reuse the model options from there. Heavy modules (torch,
transformers, sanic) are imported inside the commands, after logging is configured, so
``--help`` is fast and an import failure is logged.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import inspect
import logging
import os
import signal
import sys
import typing
from collections.abc import Callable
from typing import Annotated, Any, NoReturn

import typer

from eagle3_appliance.model.threads import quiet_openmp_waits
from eagle3_appliance.settings import (
    ENV_PREFIX,
    Dtype,
    OptionSpec,
    Settings,
    env_name,
    field_type,
    option_fields,
    options_markdown,
)

__all__ = ["app", "main"]

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


def exit_on_sigterm_while_loading() -> None:
    """Make SIGTERM end the process (exit 0) until Sanic installs its own handler.

    Loading a large checkpoint takes minutes, and as a container's PID 1 the process would
    otherwise ignore SIGTERM for all that time (the kernel drops signals PID 1 has no handler
    for), so ``docker stop`` would wait out its timeout and SIGKILL it. Nothing has been
    served yet, so there is nothing to drain. Sanic replaces this handler just before it
    logs "Worker ready" (it may answer a first request slightly earlier).
    """

    def stop(signum: int, frame: object) -> None:
        logging.getLogger("eagle3_appliance").info("SIGTERM while loading: exiting")
        _exit_without_teardown(0)

    signal.signal(signal.SIGTERM, stop)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# -- options generated from Settings --------------------------------------------------------


def settings_parameter(f: dataclasses.Field[Any]) -> inspect.Parameter:
    """A typer option for one :class:`Settings` field: its type, default, env var, help and minimum."""
    spec: OptionSpec = f.metadata["option"]
    cli_type = spec.cli_type if spec.cli_type is not None else field_type(f.name)
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = f.default
    extra: dict[str, Any] = {}
    if spec.min is not None and typing.get_origin(cli_type) is None:
        extra["min"] = spec.min
    if spec.secret:
        extra["show_default"] = False
    info = typer.Option(envvar=env_name(f.name), help=spec.help, **extra)
    return inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[cli_type, info]
    )


def with_settings_options(*names: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the options of these :class:`Settings` fields (all of them when none is named).

    The command receives them as keyword arguments, next to its own parameters.
    """

    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
        wanted = [f for f in option_fields() if not names or f.name in names]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> None:
            fn(**kwargs)

        command.__signature__ = inspect.Signature([*own, *map(settings_parameter, wanted)])  # type: ignore[attr-defined]
        return command

    return decorate


def _settings(values: dict[str, Any]) -> Settings:
    try:
        return Settings.from_options(values)
    except ValueError as exc:  # a bad option value: a usage error, not a crash
        raise typer.BadParameter(str(exc)) from None


@app.command()
@with_settings_options()
def serve(**values: Any) -> None:
    """Load the target and serve it until SIGINT/SIGTERM. Every option also reads EAGLE3_<NAME>."""
    exit_on_sigterm_while_loading()
    # Before torch loads OpenMP: pool threads that sleep at operator barriers instead of
    # spinning (eagle3_appliance.model.threads); the same results, no stalls on shared cores.
    policy = quiet_openmp_waits(os.environ, torch_loaded="torch" in sys.modules)
    settings = _settings(values)
    configure_logging(settings.log_level)
    logging.getLogger("eagle3_appliance").info("OpenMP wait policy: %s", policy or "the runtime's default")
    from transformers.utils import logging as hf_logging

    from eagle3_appliance.model.loading import load_target
    from eagle3_appliance.serving.server import create_app, run_server

    hf_logging.disable_progress_bar()
    try:
        target = load_target(settings)
    except (ValueError, ImportError) as exc:  # bad aux layer ids, a loader or kernels not here: a user error
        raise typer.BadParameter(str(exc)) from None
    logging.getLogger("eagle3_appliance").info("serving %s on %s:%d", target.model_info(), settings.host, settings.port)
    _exit_without_teardown(run_server(create_app(settings, target), settings))


def _exit_without_teardown(code: int) -> NoReturn:
    """Exit once the server has stopped, skipping the interpreter's module teardown.

    Finalising torch's and transformers' modules (a full garbage collection over them) takes
    seconds after the server has already said ``Server Stopped``: a restart, ``docker stop`` or
    a Slurm step waits for nothing useful. The exit handlers still run (log handlers flushed,
    anything registered with :mod:`atexit`); only the teardown that frees memory the kernel
    frees anyway is skipped.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


@app.command()
def options(
    markdown: Annotated[
        bool, typer.Option(help="Print the Markdown table of docs/reference/server-options.md.")
    ] = False,
) -> None:
    """List every server option with its environment variable and default."""
    if markdown:
        typer.echo(options_markdown(), nl=False)
        return
    for f in option_fields():
        spec: OptionSpec = f.metadata["option"]
        typer.echo(f"--{f.name.replace('_', '-'):<24} {env_name(f.name):<30} {spec.help}")


@app.command()
def gpus(
    url: Annotated[
        str | None, typer.Option(help="Ask a running server's GET /gpus instead of this machine's NVML.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON of GET /gpus instead of a table.")] = False,
) -> None:
    """GPU health from NVML: memory, utilisation, temperature, power, throttling, ECC, row remap, XIDs."""
    import json

    from eagle3_appliance.ops.gpu import GpuReport, format_table, read_report, report_from_json

    report: GpuReport
    if url is None:
        report = read_report()
    else:
        report = report_from_json(_get_gpus(url))
    typer.echo(json.dumps(report.to_json(), indent=2) if as_json else format_table(report))
    raise typer.Exit(1 if report.fatal_reasons() else 0)


def _get_gpus(url: str) -> dict[str, Any]:
    import httpx

    from eagle3_client.auth import auth_headers
    from eagle3_client.options import ClientOptions
    from eagle3_client.protocol import EP_GPUS, path

    try:
        resp = httpx.get(
            url.rstrip("/") + path(EP_GPUS), headers=auth_headers(ClientOptions.resolve().auth_token()), trust_env=False
        )
    except httpx.HTTPError as exc:
        raise typer.BadParameter(f"cannot reach {url}: {exc}") from None
    if resp.status_code != 200:
        raise typer.BadParameter(f"{url}{path(EP_GPUS)} answered HTTP {resp.status_code}: {resp.text[:200]}")
    report: dict[str, Any] = resp.json()
    return report


BatchesOpt = Annotated[int, typer.Option(help="How many /generate round-trips.")]
BatchSizeOpt = Annotated[int, typer.Option(help="Sequences per batch.")]
SeqLenOpt = Annotated[int, typer.Option(help="Tokens per sequence.")]
DraftVocabOpt = Annotated[int, typer.Option(help="Draft vocabulary size.")]
EncodingOpt = Annotated[
    typing.Optional[str],  # noqa: UP045 - typer reads this at runtime
    typer.Option(
        envvar=ENV_PREFIX + "ENCODING",
        help="Supervision encoding the client asks for: probs, logits, hidden or topk:K (default probs).",
    ),
]
_MODEL_OPTIONS = ("model", "dtype", "device", "cache_dir")


@app.command()
@with_settings_options(*_MODEL_OPTIONS)
def demo(
    port: Annotated[int, typer.Option(help="Port for the demo server (0 = a free one).")] = 0,
    batches: BatchesOpt = 4,
    batch_size: BatchSizeOpt = 2,
    seq_len: SeqLenOpt = 256,
    draft_vocab: DraftVocabOpt = 512,
    encoding: EncodingOpt = None,
    **model_options: Any,
) -> None:
    """The main job on one machine: start a server, drive it with the client, check the bits."""
    configure_logging("WARNING")
    from eagle3_appliance.demo import DriveSpec, run_demo

    spec = DriveSpec(_settings(model_options), batches, batch_size, seq_len, draft_vocab, encoding)
    raise typer.Exit(run_demo(spec, port=port))


@app.command()
@with_settings_options(*_MODEL_OPTIONS)
def validate(
    url: Annotated[
        list[str],
        typer.Option(envvar=ENV_PREFIX + "URLS", help="Server URL; repeat, or comma-separate in EAGLE3_URLS."),
    ],
    batches: BatchesOpt = 4,
    batch_size: BatchSizeOpt = 2,
    seq_len: SeqLenOpt = 128,
    draft_vocab: DraftVocabOpt = 512,
    encoding: EncodingOpt = None,
    **model_options: Any,
) -> None:
    """Drive running servers with the client and check every answer against a local copy of the model."""
    configure_logging("WARNING")
    from eagle3_appliance.demo import DriveSpec, run_validate

    urls = [u for item in url for u in item.split(",") if u.strip()]
    spec = DriveSpec(_settings(model_options), batches, batch_size, seq_len, draft_vocab, encoding)
    raise typer.Exit(run_validate(spec, urls))


@app.command()
def produce(
    urls: Annotated[str, typer.Option(envvar=ENV_PREFIX + "URLS", help="Appliance URLs, comma-separated.")],
    queue: Annotated[str, typer.Option(help="The run's queue: appliance://host:port or redis://host:port/db.")],
    run_id: Annotated[str, typer.Option(help="The run's id; the same id resumes a run where it stands.")],
    dataset: Annotated[
        str | None, typer.Option(help="Pre-tokenized rows: a JSONL file or a datasets save_to_disk folder.")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            "-c",
            help="An EAGLE-3 or DFlash-family recipe YAML instead of --dataset: its own data pipeline, one run "
            "per epoch and rank (a DFlash one with --capture dflash:...).",
        ),
    ] = None,
    trainers: Annotated[int, typer.Option(help="With --config: the recipe's data-parallel trainer ranks.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Rows per batch (packed rows per batch when packing).")] = 2,
    packed_sequence_size: Annotated[int, typer.Option(help="Pack rows into rows of this many tokens (0 = no).")] = 0,
    pad_token_id: Annotated[int, typer.Option(help="The token id padding is made of.")] = 0,
    capture: Annotated[
        str,
        typer.Option(
            help="eagle3, a DFlash capture (dflash:L1,L2,... or dflash+logits:L1,L2,...) or a DSpark one "
            "(dspark:L1,L2,..., with --dataset)"
        ),
    ] = "eagle3",
    encoding: Annotated[str, typer.Option(help="EAGLE-3 supervision encoding: probs, logits or topk:K.")] = "probs",
    vocab_mapping: Annotated[
        str | None, typer.Option(help="Torch file with selected_token_ids and selected_token_mask (EAGLE-3).")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the dataset (--config: the recipe's num_epochs).")] = 1,
    visibility_timeout: Annotated[
        float, typer.Option(help="Seconds a trainer's lease lives before it is redelivered.")
    ] = 60.0,
    in_flight: Annotated[int, typer.Option(help="Batches in flight per appliance.")] = 2,
    in_order: Annotated[
        bool | None,
        typer.Option(
            "--in-order/--any-order",
            help="Put samples on the queue in dataset order (default with --config), or as computed (default "
            "with --dataset: a slow appliance then holds back only its own samples).",
        ),
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Give up (exit 1) if the run is not done by then.")] = None,
    auth_token: Annotated[str | None, typer.Option(envvar=ENV_PREFIX + "AUTH_TOKEN", help="Bearer token.")] = None,
) -> None:
    """Have appliances compute a run's batches ahead and announce them on its queue; exit 0 once all are acked."""
    configure_logging("INFO")
    from eagle3_appliance.produce import batches_of, load_vocab_mapping, read_rows
    from eagle3_client.capture import Capture
    from eagle3_client.streaming.producer import Producer, RunPlan, sample_id

    if (dataset is None) == (config is None):
        raise typer.BadParameter("give exactly one of --dataset (rows) and --config (a recipe YAML)")
    try:
        parsed = Capture.parse(capture)
        mapping = load_vocab_mapping(vocab_mapping) if vocab_mapping else None
        if config is not None:
            from eagle3_appliance.produce_recipe import recipe_runs

            runs = recipe_runs(config, [], run_id, trainers)
            if runs.capture_kind != parsed.kind:
                spelling = {
                    "eagle3": "eagle3",
                    "dflash": "dflash:L1,L2,... (dflash+logits:... for JetSpec)",
                    "dspark": "dspark:L1,L2,...",
                    "vispec": "vispec",
                }[runs.capture_kind]
                raise ValueError(
                    f"{runs.recipe} reads {runs.capture_kind} captures, not {parsed.kind}: give --capture "
                    f"{spelling}, the layers the recipe logs"
                )
            plans, mapping = runs.plans, runs.vocab_mapping
        else:
            assert dataset is not None
            rows = read_rows(dataset)
            batches = batches_of(rows, batch_size, packed_sequence_size=packed_sequence_size, pad_token_id=pad_token_id)
            samples = [(sample_id(e, i), b) for e in range(epochs) for i, b in enumerate(batches)]
            plans = [RunPlan(run_id, samples)]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    url_list = [u.strip() for u in urls.split(",") if u.strip()]
    options: dict[str, Any] = {} if auth_token is None else {"auth_token": auth_token}
    with Producer.for_runs(
        url_list,
        queue,
        plans,
        capture=parsed,
        encoding=encoding,
        vocab_mapping=mapping,
        visibility_timeout=visibility_timeout,
        in_flight_per_server=in_flight,
        in_order=config is not None if in_order is None else in_order,
        **options,
    ) as producer:
        report = producer.run(timeout=timeout)
    typer.echo(
        f"run {run_id}: {report.total} samples in {len(plans)} run(s) closed in {report.seconds:.1f} s; "
        f"computed {report.computed} ({report.recomputed} again after an appliance was lost), "
        f"{report.known_at_start} already on the queue, {report.refused_full} refusals at a high watermark"
    )


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
    capture: Annotated[
        list[str] | None,
        typer.Option(
            help="Other families' captures to list too (repeatable): dflash:L1,L2,..., "
            "dflash+logits:L1,L2,..., dspark:L1,L2,..., vispec, msd or eagle (EAGLE-1/2)",
        ),
    ] = None,
) -> None:
    """Bytes per token and per batch of a /generate answer for each supervision encoding (no download)."""
    import torch

    from eagle3_appliance.sizes import capture_rows, load_shape, longest_rows, render_longest, render_table, size_rows

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
        rows += [
            row
            for name in model
            for row in capture_rows(
                load_shape(name), captures=capture or [], dtype_bytes=dtype_bytes, batch_tokens=batch_tokens
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
        if capture:
            head = shape.vocab_size * shape.hidden_size * dtype_bytes
            typer.echo(f"dflash on {shape.name}: the client fetches the whole LM head once, in chunks: {head:,} B")
    longest = [
        row
        for name in model
        for row in longest_rows(
            load_shape(name), draft_vocab=draft_vocab, dtype_bytes=dtype_bytes, slice_mib=Settings().logits_slice_mib
        )
    ]
    if longest:
        typer.echo(
            "\nlongest sample (tokens) on one GPU, as the server derives max_batch_tokens (80% of the memory "
            "beside the weights): before = the whole logits at once (--logits-slice-mib 0), after = the LM head "
            "over slices; a smaller draft vocabulary leaves room for more tokens; the model's context may be "
            "shorter\n"
        )
        typer.echo(render_longest(longest, draft_vocab=draft_vocab, markdown=markdown))


def main() -> None:
    app()
