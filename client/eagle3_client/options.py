"""Every option of the training client, declared once: keyword, type, default, environment variable, help.

``RemoteEagle3TargetModel.from_urls(urls, **options)`` takes each field of
:class:`ClientOptions` as a keyword argument; a keyword that is not given (or None) falls back
to the field's environment variable, then to its default (:meth:`ClientOptions.resolve`).
NeMo AutoModel's recipe sets the same options as ``recipe_args.remote_<name>``
(:mod:`eagle3_client.automodel`), and the docs' option table is :func:`options_markdown`.

Adding an option is one field here (plus its use and its test).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eagle3_client import protocol

__all__ = ["AUTO", "DATA_PLANE_CHOICES", "ClientOptions", "checked_value", "option_fields", "options_markdown"]

AUTO = "auto"
DATA_PLANE_CHOICES = (AUTO, *protocol.TIERS)  # the data_plane option (and DataPlaneConfig.preference)


def option(
    default: Any,
    help: str,
    *,
    env: str | None = None,
    recipe_key: str | None = None,
    min: float | None = None,
    positive: bool = False,
    secret: bool = False,
) -> Any:
    """Declare a :class:`ClientOptions` field: ``env`` is its variable, ``recipe_key`` its
    ``recipe_args`` key (default ``remote_<name>`` when there is a variable); ``min`` is the
    smallest accepted value, ``positive`` means above zero."""
    metadata = {"help": help, "env": env, "recipe_key": recipe_key, "min": min, "positive": positive, "secret": secret}
    return field(default=default, repr=not secret, metadata=metadata)


@dataclass(frozen=True)
class ClientOptions:
    """The client's options, resolved: keyword, else environment, else default."""

    timeout: float = option(
        120.0, "Seconds for connecting and for each read and write of a request (upstream's).", positive=True
    )
    generate_timeout: float | None = option(
        None,
        "Seconds to wait for a /generate answer. None = our servers' --request-timeout plus 30 s, at least "
        "timeout (the server answers 200 or its time-limit 503 by then, so a /generate that timed out is not "
        "sent again: the wait is bounded by that plus a 5 s readiness probe, 635 s with the defaults; a server whose "
        "heartbeat fails loses its requests to a ready server at once), or timeout for an upstream server. Set, "
        "a /generate that timed out is sent again max_retries times under one request id, then raised while its "
        "server answers ready.",
        env="EAGLE3_GENERATE_TIMEOUT",
        positive=True,
    )
    max_retries: int = option(3, "Extra attempts after a connection error, a timeout or a 503 (upstream's).", min=0)
    backoff: float = option(1.0, "First retry back-off in seconds, doubled after each attempt.", min=0)
    encoding: str | None = option(
        None, "Supervision encoding to ask for: probs, logits, hidden or topk:K (None = probs).", env="EAGLE3_ENCODING"
    )
    token: str | None = option(
        None,
        "Bearer token for servers started with one.",
        env="EAGLE3_AUTH_TOKEN",
        recipe_key="remote_auth_token",
        secret=True,
    )
    token_file: str | None = option(
        None, "File holding the bearer token (read when no token is given).", env="EAGLE3_AUTH_TOKEN_FILE"
    )
    data_plane: str = option(
        AUTO,
        "How answers travel: auto (nccl where both ends can, else wire: the fastest), or force nccl, gloo or wire.",
        env="EAGLE3_DATA_PLANE",
    )
    data_plane_timeout: float = option(
        60.0, "Seconds one group transfer may take before the answer is fetched over the wire.",
        env="EAGLE3_DATA_PLANE_TIMEOUT", positive=True,
    )  # fmt: skip
    data_plane_connect_timeout: float = option(
        60.0, "Seconds to join a group, hello included.", env="EAGLE3_DATA_PLANE_CONNECT_TIMEOUT", positive=True
    )
    data_plane_backoff: float = option(
        5.0,
        "Seconds on the wire after a broken transfer before the group is tried again (doubles per failure).",
        env="EAGLE3_DATA_PLANE_BACKOFF",
        min=0,
    )
    lease_seconds: float | None = option(
        None,
        "Session lease to ask our servers for (None = the server's default; a server raises it to its "
        "--min-lease-seconds, 1 s by default); the client heartbeats 3x per granted lease.",
        env="EAGLE3_LEASE_SECONDS",
        positive=True,
    )
    buffer_pool_mb: float = option(
        2048.0,
        "Memory (MiB) kept for reusing received answers; 0 = allocate afresh.",
        env="EAGLE3_CLIENT_POOL_MB",
        min=0,
    )
    max_in_flight_per_server: int = option(
        2,
        "Requests of this process in flight on one server: 2 lets its next forward run while the previous answer "
        "travels.",
        env="EAGLE3_MAX_IN_FLIGHT_PER_SERVER",
        min=1,
    )
    failover_timeout: float = option(
        600.0,
        "Seconds a request waits for a ready server when every server is out (long enough for a restart), then "
        "NoServerReady.",
        env="EAGLE3_FAILOVER_TIMEOUT",
        min=0,
    )
    probe_interval: float = option(
        1.0,
        "Seconds before the first readiness probe of a server that failed; doubled after each failed probe.",
        env="EAGLE3_PROBE_INTERVAL",
        positive=True,
    )
    probe_max_interval: float = option(
        10.0,
        "Longest wait between readiness probes: a restarted server is used again within this of answering ready.",
        env="EAGLE3_PROBE_MAX_INTERVAL",
        positive=True,
    )
    server_list: str | None = option(
        None,
        "File of server URLs, one per line, re-read when it changes (servers join and drain during a run); used when "
        "no URLs are given.",
        env="EAGLE3_SERVER_LIST",
    )

    def __post_init__(self) -> None:
        for f in option_fields():
            _check(f, getattr(self, f.name))
        # Checks across fields belong here only: one field's check must not judge it against defaults.
        if self.probe_max_interval < self.probe_interval:
            raise ValueError(
                f"probe_max_interval ({self.probe_max_interval:g}) must be at least "
                f"probe_interval ({self.probe_interval:g})"
            )

    @classmethod
    def resolve(cls, env: Mapping[str, str] | None = None, **given: Any) -> ClientOptions:
        """Keyword arguments win (None counts as not given); then the environment; then the defaults.

        A value from the environment that does not parse is a ``ValueError`` naming the variable.
        """
        env = os.environ if env is None else env
        names = {f.name for f in option_fields()}
        unknown = sorted(set(given) - names)
        if unknown:
            raise TypeError(f"unknown client option(s) {unknown}; the options are {sorted(names)}")
        values: dict[str, Any] = {}
        for f in option_fields():
            value = given.get(f.name)
            source = f.name
            if value is None and f.metadata["env"]:
                raw = env.get(f.metadata["env"], "").strip()
                value, source = (raw or None), f.metadata["env"]
            if value is not None:
                values[f.name] = _convert(value, f, source)
        return cls(**values)

    def describe(self) -> str:
        """For logs: every option that differs from its default, secrets masked."""
        shown = []
        for f in option_fields():
            value = getattr(self, f.name)
            if value != f.default:
                shown.append(f"{f.name}={'***' if f.metadata['secret'] else value}")
        return ", ".join(shown) or "client defaults"

    @property
    def buffer_pool_bytes(self) -> int:
        return int(self.buffer_pool_mb * (1 << 20))

    def auth_token(self) -> str | None:
        """The bearer token: ``token``, else the content of ``token_file``."""
        if self.token and self.token.strip():
            return self.token.strip()
        if self.token_file:
            try:
                return Path(self.token_file).read_text().strip() or None
            except OSError as exc:
                raise ValueError(f"cannot read the auth token file {self.token_file}: {exc.strerror}") from None
        return None


def checked_value(f: dataclasses.Field[Any], value: Any) -> Any:
    """``value`` as option ``f`` takes it, checked on its own (no other field is consulted).

    For callers that name the value's origin (a recipe key) before the options are resolved.
    """
    converted = _convert(value, f, f.name)
    _check(f, converted)
    return converted


def _check(f: dataclasses.Field[Any], value: Any) -> None:
    """One field's own rules: its minimum, positivity, and (``data_plane``) its choices."""
    if value is None:
        return
    low = f.metadata["min"]
    if low is not None and value < low:
        raise ValueError(f"{f.name} must be at least {low:g}, got {value!r}")
    if f.metadata["positive"] and value <= 0:
        raise ValueError(f"{f.name} must be positive, got {value!r}")
    if f.name == "data_plane" and value not in DATA_PLANE_CHOICES:
        raise ValueError(f"data_plane must be one of {list(DATA_PLANE_CHOICES)}, got {value!r}")


def _convert(value: Any, f: dataclasses.Field[Any], source: str) -> Any:
    """A keyword's or variable's value as the field's type (``str``, ``int`` or ``float``)."""
    kind = typing.get_type_hints(ClientOptions)[f.name]
    base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
    if base is str:
        text = str(value).strip()
        return text.lower() if f.name == "data_plane" else text
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{source} must be a number, got {value!r}")
    try:
        return base(value)
    except ValueError:
        raise ValueError(f"{source} must be a number, got {value!r}") from None


def option_fields() -> list[dataclasses.Field[Any]]:
    """The options, in declaration order."""
    return list(dataclasses.fields(ClientOptions))


def recipe_key(f: dataclasses.Field[Any]) -> str | None:
    """The ``recipe_args`` key of an option (AutoModel YAML), or None if the recipe cannot set it."""
    if not f.metadata["env"]:
        return None
    return str(f.metadata["recipe_key"] or f"remote_{f.name}")


def options_markdown() -> str:
    """The option table of ``docs/reference/client-options.md`` (generated from the declarations)."""
    lines = [
        "<!-- generated by: python -m eagle3_client.options (do not edit by hand) -->",
        "# Client options",
        "",
        "Keyword arguments of `RemoteEagle3TargetModel.from_urls(urls, device=..., **options)`. A keyword",
        "that is not given falls back to its environment variable, then to the default. In a NeMo",
        "AutoModel recipe the same options are `recipe_args` keys (see [NeMo AutoModel](../automodel.md)).",
        "",
        "| keyword | environment | recipe_args | default | what it does |",
        "|---|---|---|---|---|",
    ]
    for f in option_fields():
        env = f"`{f.metadata['env']}`" if f.metadata["env"] else "-"
        key = recipe_key(f)
        default = "(none)" if f.default is None or f.metadata["secret"] else f"`{f.default}`"
        help_text = str(f.metadata["help"]).replace("|", "\\|")
        lines.append(f"| `{f.name}` | {env} | {f'`{key}`' if key else '-'} | {default} | {help_text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(options_markdown(), end="")
