"""Every server option, declared once: name, type, default, environment variable and help.

Each field of :class:`Settings` is an option. Its ``metadata["option"]`` (:class:`OptionSpec`)
carries the help text and the command-line details; the environment variable is derived from
the name (``max_seq_len`` -> ``EAGLE3_MAX_SEQ_LEN``). Everything else reads these
declarations: the ``eagle3-appliance serve`` command is generated from them
(:mod:`eagle3_appliance.cli`), :func:`options_markdown` writes the option table of the docs
(``eagle3-appliance options --markdown``, checked by a test), and ``Settings(...)`` validates
the same values for library users and the CLI alike (``ValueError`` with the option's name).

Adding an option is one field here (plus its use and its test).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTIN_MODEL",
    "ENV_PREFIX",
    "Device",
    "Dtype",
    "Loader",
    "OptionSpec",
    "Settings",
    "default_cache_dir",
    "env_name",
    "load_token",
    "option_fields",
    "options_markdown",
    "parse_aux_layer_ids",
    "parse_device_map",
    "parse_max_memory",
    "parse_port_range",
]

# Every option can also be set as ENV_PREFIX + NAME (``--max-seq-len`` -> ``EAGLE3_MAX_SEQ_LEN``),
# which is how containers and Slurm jobs configure the server.
ENV_PREFIX = "EAGLE3_"

# The value of ``--model`` that selects the built-in tiny model (also the default).
BUILTIN_MODEL = "builtin"

DATA_PLANE_TIERS = ("nccl", "gloo")


class Dtype(str, Enum):
    """Model dtype. ``auto`` is bfloat16 on CUDA and float32 on CPU (upstream's choice)."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Device(str, Enum):
    """Where the model runs. ``auto`` is ``cuda`` when a GPU is visible, else ``cpu``."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Loader(str, Enum):
    """How the checkpoint becomes a model: transformers' ``from_pretrained``, or NeMo AutoModel's recipe loader."""

    transformers = "transformers"
    automodel = "automodel"


def parse_device_map(spec: str) -> str | dict[str, int | str] | None:
    """``--device-map``: ``""`` -> None (one device), a strategy or a device name as is, a JSON object -> dict.

    A JSON object maps module names to devices (``{"model.embed_tokens": 0, "model.layers.0": "cpu"}``);
    integers are GPU indices, as transformers reads them.
    """
    spec = spec.strip()
    if not spec:
        return None
    if not spec.startswith("{"):
        return spec
    import json

    try:
        value = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise ValueError(f"a device map must be a JSON object, got {spec!r} ({exc.msg})") from None
    if not value or not all(isinstance(k, str) and isinstance(v, (int, str)) for k, v in value.items()):
        raise ValueError(f"a device map maps module names to devices (an index or a name), got {spec!r}")
    return dict(value)


def parse_max_memory(spec: str) -> dict[int | str, str] | None:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` -> ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``; ``""`` -> None."""
    spec = spec.strip()
    if not spec:
        return None
    limits: dict[int | str, str] = {}
    for item in spec.split(","):
        device, sep, amount = (part.strip() for part in item.partition("="))
        if not sep or not device or not amount:
            raise ValueError(f"expected DEVICE=AMOUNT pairs like 0=70GiB,cpu=200GiB, got {spec!r}")
        limits[int(device) if device.isdigit() else device] = amount
    return limits


def default_cache_dir() -> Path:
    """Where the built-in model is written: ``$XDG_CACHE_HOME/eagle3-appliance``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "eagle3-appliance"


def env_name(name: str) -> str:
    """The environment variable of an option: ``max_seq_len`` -> ``EAGLE3_MAX_SEQ_LEN``."""
    return ENV_PREFIX + name.upper()


def parse_aux_layer_ids(value: str | None) -> tuple[int, ...] | None:
    """``"1,3,4"`` -> ``(1, 3, 4)``; empty means the protocol default."""
    if value is None or not value.strip():
        return None
    try:
        ids = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {value!r}") from None
    return ids


def parse_port_range(spec: str) -> tuple[int, int] | None:
    """``"29600-29699"`` -> ``(29600, 29699)``, ``"29600"`` -> one port, ``""``/``"0"`` -> None (kernel's choice)."""
    spec = spec.strip()
    if spec in ("", "0"):
        return None
    try:
        low, _, high = spec.partition("-")
        first, last = int(low), int(high or low)
    except ValueError:
        raise ValueError(f"expected a port or a range like 29600-29699, got {spec!r}") from None
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"port range {spec!r} must satisfy 1 <= first <= last <= 65535")
    return first, last


@dataclass(frozen=True)
class OptionSpec:
    """How one :class:`Settings` field appears as an option.

    * ``help`` - one line for ``--help`` and the docs table.
    * ``min`` - smallest accepted value (checked by ``Settings`` and shown by the CLI).
    * ``cli_type`` / ``parse`` - the command-line type and the function that turns it into the
      field's value, for fields whose type the command line cannot spell (a tuple).
    * ``secret`` - never show the value (``--help`` defaults, docs, ``repr``).
    * ``default_text`` - the docs' words for a ``None`` default that means "derived at start-up".
    """

    help: str
    min: float | None = None
    cli_type: Any = None
    parse: Callable[[Any], Any] | None = None
    secret: bool = False
    default_text: str | None = None


def option(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    cli_type: Any = None,
    parse: Callable[[Any], Any] | None = None,
    secret: bool = False,
    default_factory: Callable[[], Any] | None = None,
    default_text: str | None = None,
) -> Any:
    """Declare a :class:`Settings` field as an option (see :class:`OptionSpec`)."""
    spec = OptionSpec(help=help, min=min, cli_type=cli_type, parse=parse, secret=secret, default_text=default_text)
    metadata = {"option": spec}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, repr=not secret, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to start; immutable once built and validated on creation."""

    # -- the model -----------------------------------------------------------------------
    model: str = option(
        BUILTIN_MODEL, f"Causal LM to serve: a local folder or a hub id. '{BUILTIN_MODEL}' is the built-in tiny Llama."
    )
    dtype: Dtype = option(Dtype.auto, "Model dtype; auto = bfloat16 on CUDA, float32 on CPU.")
    device: Device = option(Device.auto, "Where the model runs; auto = cuda if visible.")
    aux_layer_ids: tuple[int, ...] | None = option(
        None,
        "Three distinct decoder layers to capture, e.g. '1,15,28'. Default [1, L//2-1, L-4].",
        cli_type=typing.Optional[str],  # noqa: UP045 - typer needs the typing spelling at runtime
        parse=parse_aux_layer_ids,
    )
    trust_remote_code: bool = option(False, "Allow the model folder's own Python code.")
    loader: Loader = option(
        Loader.transformers,
        "How the model is built: transformers' from_pretrained, or automodel = NeMo AutoModel's EAGLE-3 recipe "
        "loader for its co-located target (needs nemo-automodel and CUDA).",
    )
    attn_implementation: str = option(
        "",
        "Attention kernels as transformers names them (sdpa, eager, flash_attention_2, ...); the recipe's "
        "target_attn_implementation. Empty = transformers' default.",
    )
    automodel_force_hf: bool = option(
        False, "With --loader automodel: the recipe's target_force_hf (the transformers model class)."
    )
    device_map: str = option(
        "",
        "Spread the layers over this node's devices in one process: auto, balanced, sequential, one device, or a "
        "JSON object {module: device}. Bit-exact per device type. Empty = all on --device.",
    )
    max_memory: str = option("", "With --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB.")
    tensor_parallel_size: int = option(
        1,
        "Shard the target over this many devices of this node (transformers' tensor-parallel plan, one process "
        "per device, all started by this command). Not bit-exact: see docs/large-targets.md.",
        min=1,
    )
    tensor_parallel_timeout: float = option(
        30.0,
        "Seconds a tensor-parallel rank may send no heartbeat before it counts as hung (the server then exits).",
        min=0.1,
    )
    cache_dir: Path = option(None, "Where the built-in model is written.", default_factory=default_cache_dir)
    # -- HTTP ----------------------------------------------------------------------------
    host: str = option("0.0.0.0", "Address to bind.")
    port: int = option(8001, "HTTP port.", min=0)
    log_level: str = option("INFO", "Python logging level.")
    max_connections: int = option(
        4096,
        "Most open client connections (lowered to fit the open-file limit); at the cap, 2 more may ask a "
        "health probe, and further ones get 503 and are closed.",
        min=1,
    )
    header_timeout: float = option(
        20.0, "Seconds a client may take to send a request's headers, in total (408 and close beyond).", min=0.1
    )
    body_timeout: float = option(
        60.0, "Seconds a client may take to send a request's body, in total (408 and close beyond).", min=0.1
    )
    keep_alive_timeout: float = option(75.0, "Seconds an idle connection stays open between requests.", min=0.1)
    # -- limits (a request beyond them gets 413 or 422 with the limit in the message; None =
    #    derived from the model and the device at start-up, eagle3_appliance.model.limits) --------
    max_seq_len: int | None = option(
        None,
        "Longest sequence per /generate (422 beyond). Default: the model's max_position_embeddings.",
        min=1,
        cli_type=typing.Optional[int],  # noqa: UP045 - typer needs the typing spelling at runtime
        default_text="from the model",
    )
    max_batch_tokens: int | None = option(
        None,
        "Most tokens (batch x length) per /generate (422 beyond). Default: what fits in the memory free after "
        "loading (CUDA), or a 16 GiB budget (CPU); see docs/operations.md.",
        min=1,
        cli_type=typing.Optional[int],  # noqa: UP045 - typer needs the typing spelling at runtime
        default_text="from memory",
    )
    logits_slice_mib: int = option(
        512,
        "Memory for one slice of the LM head's logits: past the decoder stack, the head, its argmax and the "
        "draft-vocabulary projection run over slices of the sequence of about this size, so a request's full "
        "logits never exist at once, and the limits count one slice instead (0: the whole sequence at once, "
        "as upstream). On an accelerator only samples the unsliced path cannot hold are sliced; see "
        "docs/operations.md.",
        min=0,
    )
    max_body_bytes: int = option(
        64 * 1024 * 1024,
        "Largest wire request body: /generate, /set_vocab_mapping, /lm_head_rows (413 beyond). "
        "A JSON body is at most 1 MiB, or this if smaller.",
        min=1,
    )
    max_pending_body_bytes: int = option(
        256 * 1024 * 1024,
        "Most bytes of request bodies being received or held at once, all requests together "
        "(503 + Retry-After beyond, before the body is read). At least --max-body-bytes.",
        min=1,
    )
    # -- memory and throughput -------------------------------------------------------------
    buffer_pool_mb: int = option(
        4096, "Host memory (MiB) kept for reuse by /generate answers (on the CPU also their logits); 0 = none.", min=0
    )
    microbatch_wait_ms: float = option(
        0.0,
        "Stack concurrent /generate requests of equal length into one forward, waiting at most this long for "
        "companions. Not bit-exact (see docs/performance.md). 0 = off.",
        min=0.0,
    )
    microbatch_max_tokens: int = option(16384, "Most tokens in one micro-batched forward.", min=1)
    intra_op_threads: int = option(
        0,
        "Threads torch's CPU kernels use in each forward (torch.set_num_threads; per rank with tensor "
        "parallelism). 0 = torch's default (tensor-parallel CPU ranks share the CPUs). On the CPU another count "
        "can change the answers' last bits against an in-process target on torch's default.",
        min=0,
    )
    # -- data planes -----------------------------------------------------------------------
    data_planes: str = option(
        "nccl,gloo",
        "Process-group data planes to offer besides the wire (nccl needs the model on CUDA); '' = wire only.",
    )
    data_plane_ports: str = option(
        "", "Rendezvous ports for per-client groups, e.g. 29600-29699; empty = the kernel picks free ports."
    )
    data_plane_timeout: float = option(60.0, "Seconds a rendezvous or one group transfer may take.", min=0.001)
    resend_budget_mb: int = option(
        2048,
        "Memory (MiB; GPU memory for nccl) for the answers kept for /data_plane/resend, one per session at "
        "most, and for a retry of a request id; the oldest are dropped beyond it (a dropped one costs a recompute).",
        min=0,
    )
    stream_memory_mb: int = option(
        4096,
        "High watermark (MiB; GPU memory on a GPU target) of the answers kept resident for runs' streams: a "
        "producer is refused (503 + X-Eagle3-Stream-Full) at it until they fall below the low watermark; 0 = "
        "this server computes no stream answers.",
        min=0,
    )
    stream_reserve: float = option(
        0.1,
        "Share of --stream-memory-mb new samples leave free for priority ones: samples computed again after "
        "their appliance was lost (a trainer may wait for one while every appliance is full), and the next "
        "sample of an in-order run.",
        min=0.0,
    )
    stream_low_watermark: float = option(
        0.75,
        "The low watermark as a share of --stream-memory-mb: producers resume once resident answers fall below it.",
        min=0.0,
    )
    allow_unproven_joins: bool = option(
        False,
        "Let a client join a /data_plane group without proving it owns the session (clients older than the "
        "join proof). Anyone who reads a rendezvous store's keys can then race it into the group: logged at "
        "start-up; only on a network where every peer is trusted.",
    )
    upstream_nccl_on_gloo: bool = option(
        False,
        "Test/CPU switch: with the model on the CPU, build upstream's /init_nccl group on gloo (the CPU "
        "stand-in for NCCL) instead of answering 'disabled'. For tests without a GPU, not for production.",
    )
    # -- operations ------------------------------------------------------------------------
    auth_token: str | None = option(
        None, "Bearer token every endpoint but /health/live requires. Prefer the env var or a file.", secret=True
    )
    auth_token_file: Path | None = option(None, "Read the bearer token from this file.")
    lease_seconds: float = option(60.0, "Drop a client session silent for this long.", min=0.1)
    max_lease_seconds: float = option(3600.0, "Longest lease a client may ask for in its session offer.", min=0.1)
    min_lease_seconds: float = option(
        1.0,
        "Shortest lease a client's offer is granted; shorter ones are raised to it (its client heartbeats 3x per "
        "lease).",
        min=0.1,
    )
    max_sessions: int = option(
        1024, "Most client sessions at once (each keeps a draft vocabulary on the device); 503 beyond.", min=1
    )
    exit_when_idle: bool = option(False, "Exit 0 once the last client session has left (batch jobs).")
    max_queue: int = option(64, "/generate requests that may wait (503 + Retry-After beyond).", min=0)
    request_timeout: float = option(600.0, "Most seconds a /generate may wait and compute (503 beyond).", min=0.001)
    retry_grace: float = option(
        10.0,
        "Seconds a queued /generate with a request id stays queued after its last attempt left: computed at its "
        "turn, its answer kept for the retry (within --resend-budget-mb); 0 = dropped at its turn.",
        min=0.0,
    )
    grace_period: float = option(30.0, "SIGTERM: seconds to finish in-flight requests.", min=0.0)
    gpu_poll_interval: float = option(5.0, "Seconds between NVML readings.", min=0.05)

    def __post_init__(self) -> None:
        # Accept plain strings too (Settings(device="cpu")), so library users need no enums.
        object.__setattr__(self, "dtype", Dtype(self.dtype))
        object.__setattr__(self, "device", Device(self.device))
        object.__setattr__(self, "loader", Loader(self.loader))
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        for f in option_fields():
            spec: OptionSpec = f.metadata["option"]
            value = getattr(self, f.name)
            if spec.min is not None and value is not None and value < spec.min:
                raise ValueError(f"--{_flag(f.name)} must be at least {spec.min:g}, got {value}")
        if self.aux_layer_ids is not None:
            ids = tuple(int(i) for i in self.aux_layer_ids)
            if len(ids) != 3 or len(set(ids)) != 3:
                raise ValueError(f"--aux-layer-ids needs 3 distinct layer ids, got {list(ids)}")
            object.__setattr__(self, "aux_layer_ids", ids)
        if self.stream_low_watermark + self.stream_reserve >= 1:
            raise ValueError(
                f"--stream-low-watermark ({self.stream_low_watermark:g}) plus --stream-reserve "
                f"({self.stream_reserve:g}) must be below 1"
            )
        if self.min_lease_seconds > self.max_lease_seconds:
            raise ValueError(
                f"--min-lease-seconds ({self.min_lease_seconds:g}) is above --max-lease-seconds "
                f"({self.max_lease_seconds:g})"
            )
        if self.max_pending_body_bytes < self.max_body_bytes:
            raise ValueError(
                f"--max-pending-body-bytes ({self.max_pending_body_bytes}) must be at least "
                f"--max-body-bytes ({self.max_body_bytes}), or the largest body could never be received"
            )
        unknown = sorted({t.strip() for t in self.data_planes.split(",") if t.strip()} - set(DATA_PLANE_TIERS))
        if unknown:
            raise ValueError(f"--data-planes takes nccl and/or gloo, got {unknown}")
        try:
            parse_port_range(self.data_plane_ports)
        except ValueError as exc:
            raise ValueError(f"--data-plane-ports: {exc}") from None
        object.__setattr__(self, "auth_token", load_token(self.auth_token, self.auth_token_file))
        self._check_placement()

    def _check_placement(self) -> None:
        """The placement options combine one way only: one device, a device map, or tensor parallelism."""
        try:
            parse_device_map(self.device_map)
        except ValueError as exc:
            raise ValueError(f"--device-map: {exc}") from None
        try:
            parse_max_memory(self.max_memory)
        except ValueError as exc:
            raise ValueError(f"--max-memory: {exc}") from None
        if self.max_memory.strip() and not self.device_map.strip():
            raise ValueError("--max-memory needs --device-map (it limits what the device map puts on each device)")
        if self.tensor_parallel_size > 1 and self.device_map.strip():
            raise ValueError("--tensor-parallel-size and --device-map are two ways to spread a model: choose one")
        if self.loader is Loader.automodel and (self.tensor_parallel_size > 1 or self.device_map.strip()):
            raise ValueError(
                "--loader automodel loads the recipe's co-located target on one GPU; "
                "it combines with neither --tensor-parallel-size nor --device-map"
            )
        if self.automodel_force_hf and self.loader is not Loader.automodel:
            raise ValueError("--automodel-force-hf applies to --loader automodel only")

    @property
    def is_builtin(self) -> bool:
        return self.model == BUILTIN_MODEL

    @property
    def data_plane_port_range(self) -> tuple[int, int] | None:
        return parse_port_range(self.data_plane_ports)

    @property
    def placement_mode(self) -> str:
        """How the target is placed: ``single``, ``device_map`` or ``tp=N`` (what ``/model_info`` reports)."""
        if self.tensor_parallel_size > 1:
            return f"tp={self.tensor_parallel_size}"
        return "device_map" if self.device_map.strip() else "single"

    @classmethod
    def from_options(cls, values: dict[str, Any]) -> Settings:
        """Settings from command-line values: each option's ``parse`` applied first."""
        parsed = {}
        for f in option_fields():
            if f.name not in values:
                continue
            spec: OptionSpec = f.metadata["option"]
            value = values[f.name]
            parsed[f.name] = spec.parse(value) if spec.parse is not None else value
        return cls(**parsed)


def load_token(token: str | None, token_file: Path | None) -> str | None:
    """The configured bearer token, from the value or the file; ``ValueError`` if both, or the file is unusable."""
    if token and token_file:
        raise ValueError("give either --auth-token or --auth-token-file, not both")
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the auth token file {token_file}: {exc.strerror}") from None
        if not token:
            raise ValueError(f"the auth token file {token_file} is empty")
    if token is None or not token.strip():
        return None
    return token.strip()


def option_fields() -> list[dataclasses.Field[Any]]:
    """The :class:`Settings` fields that are options, in declaration order."""
    return [f for f in dataclasses.fields(Settings) if "option" in f.metadata]


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _default_text(f: dataclasses.Field[Any]) -> str:
    spec: OptionSpec = f.metadata["option"]
    if spec.secret:
        return "(none)"
    if spec.default_text is not None:
        return spec.default_text
    if f.default_factory is not dataclasses.MISSING:
        return "see description" if f.name != "cache_dir" else "`$XDG_CACHE_HOME/eagle3-appliance`"
    value = f.default
    if value is None or value == "":
        return "(none)"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        value = str(value).lower()
    return f"`{value}`"


def options_markdown() -> str:
    """The option table of ``docs/reference/server-options.md`` (generated from the declarations)."""
    lines = [
        "<!-- generated by: eagle3-appliance options --markdown (do not edit by hand) -->",
        "# Server options",
        "",
        "Every option of `eagle3-appliance serve` can also be set through its environment variable;",
        "a flag on the command line wins over the environment. Booleans are `--name` / `--no-name`",
        "(environment: `1`/`true` or `0`/`false`).",
        "",
        "| option | environment | default | what it does |",
        "|---|---|---|---|",
    ]
    for f in option_fields():
        spec: OptionSpec = f.metadata["option"]
        help_text = spec.help.replace("|", "\\|")
        lines.append(f"| `--{_flag(f.name)}` | `{env_name(f.name)}` | {_default_text(f)} | {help_text} |")
    return "\n".join(lines) + "\n"


def field_type(name: str) -> Any:
    """The resolved type of a :class:`Settings` field (annotations are strings here)."""
    return typing.get_type_hints(Settings)[name]
