"""The appliance's one settings object, built by the CLI from flags and the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

__all__ = ["BUILTIN_MODEL", "Device", "Dtype", "ENV_PREFIX", "Settings", "default_cache_dir"]

# Every flag of ``eagle3-appliance serve`` can also be set as ENV_PREFIX + FLAG_NAME
# (``--max-seq-len`` -> ``EAGLE3_MAX_SEQ_LEN``), which is how containers configure it.
ENV_PREFIX = "EAGLE3_"

# The value of ``--model`` that selects the built-in tiny model (also the default).
BUILTIN_MODEL = "builtin"


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


def default_cache_dir() -> Path:
    """Where the built-in model is written: ``$XDG_CACHE_HOME/eagle3-appliance``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "eagle3-appliance"


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to start; immutable once built."""

    model: str = BUILTIN_MODEL
    dtype: Dtype = Dtype.auto
    device: Device = Device.auto
    aux_layer_ids: tuple[int, int, int] | None = None
    trust_remote_code: bool = False
    host: str = "0.0.0.0"
    port: int = 8001
    # Longest sequence and largest batch a /generate may ask for (422 beyond).
    max_seq_len: int = 8192
    max_batch_tokens: int = 65536
    # Largest request body accepted (413 beyond). Requests are small (token ids), so this
    # only has to hold the vocab mapping of a very large vocabulary.
    max_body_bytes: int = 64 * 1024 * 1024
    # Host memory kept for reuse by /generate answers (pinned on CUDA); 0 disables reuse.
    buffer_pool_mb: int = 4096
    # Opt-in micro-batching of concurrent /generate requests (appliance.microbatch); not
    # bit-exact. 0 ms = off. A group is flushed after this wait or once it holds max tokens.
    microbatch_wait_ms: float = 0.0
    microbatch_max_tokens: int = 16384
    cache_dir: Path = field(default_factory=default_cache_dir)
    log_level: str = "INFO"
    # Process-group data planes offered besides the wire (each only where it can work: nccl
    # needs the model on CUDA), rendezvous ports ("29600-29699"; empty = the kernel picks)
    # and the seconds a rendezvous or one transfer may take before the group is dropped.
    data_planes: str = "nccl,gloo"
    data_plane_ports: str = ""
    data_plane_timeout: float = 60.0
    # Operations (appliance/operations.py and the modules it wires up).
    auth_token: str | None = field(default=None, repr=False)  # bearer token; None = no auth
    lease_seconds: float = 60.0  # a session that sends nothing for this long is dropped
    max_lease_seconds: float = 3600.0  # the longest lease a client may ask for
    exit_when_idle: bool = False  # exit 0 once the last registered session has left
    max_queue: int = 64  # /generate requests that may wait for the model (503 beyond)
    request_timeout: float = 600.0  # most seconds a /generate may wait plus compute (503 beyond)
    grace_period: float = 30.0  # SIGTERM: seconds to finish in-flight requests before exiting
    gpu_poll_interval: float = 5.0  # seconds between NVML readings (XID events arrive at once)

    def __post_init__(self) -> None:
        # Accept plain strings too (Settings(device="cpu")), so library users need no enums.
        object.__setattr__(self, "dtype", Dtype(self.dtype))
        object.__setattr__(self, "device", Device(self.device))
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))

    @property
    def is_builtin(self) -> bool:
        return self.model == BUILTIN_MODEL
