"""The remote-target protocol: endpoint names, headers, keys and limits shared by both sides.

This module and :mod:`eagle3_client.wire` are the only places where the protocol is spelled out;
the appliance imports them, so a change here changes both ends at once. Everything in the
upstream column of ``shared/design/upstream-protocol.md`` is reproduced exactly; what we add
(marked *extension*) is only ever used after the peer has said it understands it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from eagle3_client.capture import EAGLE3, MAX_VISION_INPUTS, OFFER_KEY, Capture
from eagle3_client.quoting import quote

__all__ = [
    "CAPABILITIES",
    "CAPABILITY_PACKING",
    "CAPABILITY_STREAMED_ANSWER",
    "CAPABILITY_STREAM",
    "EP_QUEUE",
    "EP_STREAM_PRODUCE",
    "EP_STREAM_RELEASE",
    "EP_STREAM_RUNS",
    "LeaseJSON",
    "QUEUE_OPS",
    "ReleaseRequest",
    "RunDescription",
    "RunStateJSON",
    "PRIORITY_HEADER",
    "SAMPLE_HEADER",
    "SAMPLE_INPUT_KEYS",
    "STREAM_FULL_HEADER",
    "STREAM_ID_MAX_LEN",
    "SampleStatus",
    "StreamRef",
    "check_stream_id",
    "mapping_digest",
    "parse_sample_header",
    "queue_path",
    "DataPlaneReply",
    "GenerateRequest",
    "PACKING_KEYS",
    "DataPlaneRequest",
    "MAX_CLIENT_NAME",
    "MAX_JSON_BODY_BYTES",
    "WIRE_BODY_ENDPOINTS",
    "MODEL_INFO_EXTENSION_KEY",
    "ModelInfoExtension",
    "PROTOCOL_VERSION",
    "ResendRequest",
    "SessionOffer",
    "SessionReply",
    "DEFAULT_PORT",
    "EP_DISCONNECT",
    "EP_GENERATE",
    "EP_HEALTH",
    "EP_HEARTBEAT",
    "EP_INIT_NCCL",
    "EP_INPUT_EMBEDDINGS",
    "EP_MODEL_INFO",
    "EP_SET_VOCAB_MAPPING",
    "EP_SESSION",
    "EP_HEALTH_LIVE",
    "EP_HEALTH_READY",
    "EP_V2_HEALTH_LIVE",
    "EP_V2_HEALTH_READY",
    "EP_METRICS",
    "GPU_UUIDS_KEY",
    "EP_GPUS",
    "EP_LM_HEAD_ROWS",
    "SESSION_HEADER",
    "ENCODING_HEADER",
    "ERROR_ID_HEADER",
    "REQUEST_ID_HEADER",
    "FAILOVER_HEADER",
    "MAPPING_VERSION_HEADER",
    "REQUEST_ID_MAX_LEN",
    "AUTH_HEADER",
    "ENV_ENABLE_NCCL",
    "ENV_NCCL_PORT",
    "EP_DATA_PLANE",
    "EP_DATA_PLANE_RESEND",
    "RESEND_CONFLICT_STATUS",
    "TIER_GLOO",
    "TIER_NCCL",
    "TIER_WIRE",
    "TIERS",
    "TRANSFER_HEADER",
    "TRANSFER_MAGIC",
    "UPSTREAM_NCCL_GROUP_PREFIX",
    "upstream_nccl_port",
    "GENERATE_INPUT_KEYS",
    "JSON",
    "NCCL_HEADER",
    "OCTET_STREAM",
    "SUPERVISION_KEYS",
    "ENCODING_PROBS",
    "ENCODING_LOGITS",
    "ENCODING_HIDDEN",
    "ENCODING_TOPK",
    "ENCODING_KEYS",
    "KEY_DRAFT_LOGITS",
    "KEY_FINAL_HIDDEN",
    "KEY_TOPK_VALUES",
    "KEY_TOPK_INDICES",
    "VOCAB_MAPPING_KEYS",
    "default_aux_layer_ids",
    "path",
    "validate_aux_layer_ids",
]

DEFAULT_PORT = 8001
# Version of our extensions, in the session reply.
PROTOCOL_VERSION = 1
# The key of our object in /model_info's answer (only for registered sessions).
MODEL_INFO_EXTENSION_KEY = "eagle3"
_REQUIRED: Any = object()

# Endpoints. Upstream compares paths without the leading slash; ``path()`` adds it back.
EP_HEALTH = "health"
EP_MODEL_INFO = "model_info"
EP_INPUT_EMBEDDINGS = "input_embeddings"
EP_SET_VOCAB_MAPPING = "set_vocab_mapping"
EP_INIT_NCCL = "init_nccl"
EP_GENERATE = "generate"
EP_HEARTBEAT = "heartbeat"
EP_DISCONNECT = "disconnect"

# Extensions (ours). A client learns that a server has them from POST /session: an
# upstream server answers 404 there, and the client then speaks plain upstream protocol.
EP_SESSION = "session"  # register: JSON offer in, JSON {"session_id", "lease_seconds", ...} out
EP_HEALTH_LIVE = "health/live"  # process is serving
EP_HEALTH_READY = "health/ready"  # model loaded, not draining, GPU healthy; else 503 + reason
EP_V2_HEALTH_LIVE = "v2/health/live"  # KServe / Triton v2 spellings of the same probes
EP_V2_HEALTH_READY = "v2/health/ready"
EP_METRICS = "metrics"  # Prometheus text format
EP_GPUS = "gpus"  # NVML readings as JSON
# Wire blob {"selected_token_ids": int64[D]} in, {"weight": [D,H]} (rows of the LM head, model
# dtype) out: what a client on the "hidden" encoding needs to finish the projection itself.
EP_LM_HEAD_ROWS = "lm_head_rows"
# A /generate wire body, computed and kept for a run's stream (see the stream section below).
EP_STREAM_PRODUCE = "stream/produce"
# Sent by our client on every request once it has a session; requests without it belong
# to the anonymous session that upstream clients share.
SESSION_HEADER = "X-Eagle3-Session"
# The supervision encoding a /generate answer uses (absent = upstream's "probs").
ENCODING_HEADER = "X-Eagle3-Encoding"
# On a 500 answer: the id under which the server logged the failure (also in the JSON body).
ERROR_ID_HEADER = "X-Request-Id"
# The version of a session's vocab mapping: our client numbers each /set_vocab_mapping with
# it, and the server names, on every /generate answer, the mapping the answer was computed
# under, so that the client decodes it with that mapping's LM-head rows (never a mix).
MAPPING_VERSION_HEADER = "X-Eagle3-Mapping"
# On /generate: the request is a failover, re-sent here after another server failed it
# (the value is the attempt number, 2 for the first failover); the server only counts it.
FAILOVER_HEADER = "X-Eagle3-Failover"
# On /generate (our client, registered sessions only): an id of the batch, the same on every
# retry of it. A retry whose id, session and body match a /generate the server still has queued
# or computing waits for that computation instead of queueing a second forward. Letters,
# digits, "-", "_" and "." only, at most REQUEST_ID_MAX_LEN characters (400 otherwise).
REQUEST_ID_HEADER = "X-Eagle3-Request-Id"
REQUEST_ID_MAX_LEN = 128
# On a 503 to /generate: the request passed the server's time limit (--request-timeout, the
# value in seconds) while queued or computing. The server is alive and still has the request:
# our client resends it under the same request id (joining that computation) rather than
# failing the server over. An upstream client only sees a 503 with Retry-After.
TIME_LIMIT_HEADER = "X-Eagle3-Time-Limit"
AUTH_HEADER = "Authorization"  # "Bearer <token>" when the server is started with a token

# Data planes (extension). How a /generate answer's tensors travel, best first: a private
# two-rank torch.distributed group over NCCL (GPU to GPU) or gloo (CPU sockets), else the
# HTTP body ("wire", upstream's fallback, always available). The client lists the tiers it
# can do in its POST /session offer ("data_planes"); the reply lists what the server offers.
TIER_NCCL = "nccl"
TIER_GLOO = "gloo"
TIER_WIRE = "wire"
TIERS = (TIER_NCCL, TIER_GLOO, TIER_WIRE)
# In the POST /session reply (extension, only when known): the UUIDs (NVML's "GPU-..." form) of
# the GPU(s) this server's NCCL end uses. A client whose own GPU is one of them cannot pair with
# it over NCCL (two ranks on one device), so "auto" takes the wire. Absent: nothing changes.
GPU_UUIDS_KEY = "gpu_uuids"
# POST JSON {"tier": "nccl"|"gloo", "proof": true} -> {"tier", "port", "key", "nonce", "timeout",
# "secret"}: the server (rank 0) hosts a TCP store on "port" with the group's keys under "key/"
# (readable by anyone who reaches the port: a namespace, not a secret). The client's first
# message on the group is "secret" (hex of PROOF_BYTES bytes, tagged with "nonce"); the server
# checks it before it sends anything, closes the store, and sends a zero-tensor hello whose
# sequence number is "nonce". Without "proof" (older clients) there is no secret and the hello
# comes at once. {"tier": "wire"} tears the session's group down. GET -> status of every group.
EP_DATA_PLANE = "data_plane"
# POST JSON {"seq": n} -> the session's stored result of transfer n as a wire blob (no
# recompute); RESEND_CONFLICT_STATUS when the server holds no result for n.
EP_DATA_PLANE_RESEND = "data_plane/resend"
RESEND_CONFLICT_STATUS = 409
# The endpoints whose request body is a wire-format tensor dictionary, bounded by the server's
# --max-body-bytes. Every other endpoint takes a JSON body (or none) of at most
# MAX_JSON_BODY_BYTES (413 beyond, before it is read): a session offer or a group request is a
# few hundred bytes, and a body parsed on the event loop must stay small enough not to stall it.
WIRE_BODY_ENDPOINTS = frozenset({EP_GENERATE, EP_SET_VOCAB_MAPPING, EP_LM_HEAD_ROWS, EP_STREAM_PRODUCE})
MAX_JSON_BODY_BYTES = 1 << 20
# On /generate: the client names the transfer (its sequence number); the server echoes it
# when the body is transfer metadata (JSON) and the tensors follow on the group. Without
# the echo the body is a wire blob, exactly as for upstream's X-NeMo-NCCL.
TRANSFER_HEADER = "X-Eagle3-Transfer"
# First int64 of the header tensor of every group transfer: [magic, seq, n_tensors, bytes].
TRANSFER_MAGIC = 0x45334450  # "E3DP"

# Content types.
OCTET_STREAM = "application/octet-stream"
JSON = "application/json"

# The client offers NCCL with ``X-NeMo-NCCL: 1``; the server echoes it when the body is
# NCCL metadata instead of a wire blob.
NCCL_HEADER = "X-NeMo-NCCL"

# Upstream's NCCL rendezvous knobs (read by both ends).
ENV_NCCL_PORT = "NEMO_EAGLE_NCCL_PORT"
ENV_ENABLE_NCCL = "NEMO_EAGLE_ENABLE_NCCL"
# Upstream builds its group through torch's _new_process_group_helper under this name (+ the
# port); the helper nests PrefixStore("<name>/") and PrefixStore("<device>/"), and a
# PrefixStore adds its own "/", so NCCL's keys are "<prefix><port>//cuda//<key>" in the store.
UPSTREAM_NCCL_GROUP_PREFIX = "nemo_eagle_target_transfer_"

# Keys of the /generate request and of its response, in wire order.
GENERATE_INPUT_KEYS = ("input_ids", "attention_mask", "loss_mask")
# Capabilities (extension): what a /generate body may ask beyond upstream's three tensors.
# The client lists the ones it may use in its POST /session offer ("capabilities"); the reply
# lists those the server grants. A body that asks for one the session was not granted is
# refused (400) before anything is computed; without a session (upstream) none is granted.
CAPABILITY_PACKING = "packing"
# The wire answer may start leaving before it is complete (the server's framing is unchanged;
# a failure after the head went out cuts the body short, which the client retries).
CAPABILITY_STREAMED_ANSWER = "streamed-answer"
# The session may claim answers kept resident on this server for a run's stream (/generate
# with SAMPLE_HEADER) and produce them (/stream/produce): see the stream section below.
CAPABILITY_STREAM = "stream"
CAPABILITIES = (CAPABILITY_PACKING, CAPABILITY_STREAMED_ANSWER, CAPABILITY_STREAM)
# A packed request (several documents per row, the recipe's packed_sequence_size) adds these
# [B,T] / [B,max_docs] tensors to the body, after GENERATE_INPUT_KEYS: per-document position
# ids, the 0-padded document lengths (each row sums to T), and the real tokens after each slot
# within its document (the trainer's supervision gate; checked, not used by the forward).
PACKING_KEYS = ("position_ids", "seq_lens", "doc_remaining")
SUPERVISION_KEYS = ("aux_hidden_states", "target_probs", "position_mask", "input_ids", "loss_mask")
VOCAB_MAPPING_KEYS = ("selected_token_ids", "selected_token_mask")

# Supervision encodings (extension): how the draft-vocab distribution travels. The client
# names one in its POST /session offer ("encoding", plus "encodings": what it can decode);
# the reply's "encoding" is what the server will send, and each /generate answer in a
# non-default encoding carries ENCODING_HEADER. Without a session it is always "probs".
ENCODING_PROBS = "probs"  # upstream: float32 probabilities [B,T,D]
ENCODING_LOGITS = "logits"  # draft-vocab logits [B,T,D] in the model dtype
ENCODING_HIDDEN = "hidden"  # final hidden state [B,T,H]; the client projects with LM-head rows
ENCODING_TOPK = "topk"  # spelled "topk:K": the K largest probabilities and their indices (lossy)
KEY_DRAFT_LOGITS = "draft_logits"
KEY_FINAL_HIDDEN = "final_hidden"
KEY_TOPK_VALUES = "topk_values"  # float32 [B,T,K], not renormalised: their sum is the kept mass
KEY_TOPK_INDICES = "topk_indices"  # int16 [B,T,K] when D <= 32768, else int32
# The /generate response keys of each encoding, in wire order: upstream's, with
# "target_probs" replaced by the encoding's own tensors.
ENCODING_KEYS: dict[str, tuple[str, ...]] = {
    ENCODING_PROBS: SUPERVISION_KEYS,
    ENCODING_LOGITS: ("aux_hidden_states", KEY_DRAFT_LOGITS, "position_mask", "input_ids", "loss_mask"),
    ENCODING_HIDDEN: ("aux_hidden_states", KEY_FINAL_HIDDEN, "position_mask", "input_ids", "loss_mask"),
    ENCODING_TOPK: ("aux_hidden_states", KEY_TOPK_VALUES, KEY_TOPK_INDICES, "position_mask", "input_ids", "loss_mask"),
}


def path(endpoint: str) -> str:
    """The URL path of an endpoint name (``"generate"`` -> ``"/generate"``)."""
    return "/" + endpoint.lstrip("/")


def upstream_nccl_port(http_port: int, env: str | None = None) -> int:
    """Upstream's rendezvous port: ``NEMO_EAGLE_NCCL_PORT`` if set, else the HTTP port + 100."""
    return int(env) if env else http_port + 100


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3's low/mid/high capture layers ``[1, L//2 - 1, L - 4]``.

    Raises instead of deduplicating on shallow models: the draft's ``fc`` is sized for
    exactly three captured layers, and a silent collapse would fail much later.
    """
    ids = [1, num_layers // 2 - 1, num_layers - 4]
    if any(i < 0 or i >= num_layers for i in ids) or len(set(ids)) != 3:
        raise ValueError(
            f"a model with {num_layers} layers is too shallow for the default aux layers {ids}; "
            "pass 3 distinct layer ids explicitly"
        )
    return ids


def validate_aux_layer_ids(aux_layer_ids: list[int], num_layers: int) -> list[int]:
    """Check an explicit aux-layer choice: exactly 3 distinct ids in ``[0, num_layers)``."""
    ids = [int(i) for i in aux_layer_ids]
    if len(ids) != 3:
        raise ValueError(f"EAGLE-3 needs exactly 3 aux layer ids, got {len(ids)}: {ids}")
    if len(set(ids)) != 3:
        raise ValueError(f"aux layer ids must be distinct, got {ids}")
    for i in ids:
        if not 0 <= i < num_layers:
            raise ValueError(f"aux layer id {i} is out of range for a model with {num_layers} layers")
    return ids


# -- JSON bodies of our extension endpoints ------------------------------------------------
#
# Both ends build and read these bodies only through the schemas below: ``to_json()`` writes
# one, ``from_json()`` reads one and raises ``ValueError`` naming the field that is wrong (the
# server answers 400/422 with that text; the client raises ``ProtocolViolation``). Unknown
# keys are ignored, so either end can add an optional field without breaking the other.


def _field(body: Mapping[str, Any], key: str, kinds: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
    if key not in body or body[key] is None:
        if default is _REQUIRED:
            raise ValueError(f"missing {key!r}")
        return default
    value = body[key]
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ValueError(f"{key!r} must be {_kind_names(kinds)}, got {quote(value)}")
    if not isinstance(value, kinds):
        raise ValueError(f"{key!r} must be {_kind_names(kinds)}, got {type(value).__name__} {quote(value)}")
    return value


def _names(body: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = _field(body, key, list, [])
    if not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key!r} must be a list of strings, got {quote(value)}")
    return tuple(value)


def _kind_names(kinds: type | tuple[type, ...]) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(
        {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}.get(k, k.__name__)
        for k in kinds
    )


def _object(body: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise ValueError(f"{what} must be a JSON object, got {type(body).__name__}")
    return body


@dataclass(frozen=True)
class GenerateRequest:
    """What one ``/generate`` asks the server for: upstream's batch plus the extensions it uses.

    The one description of a request, read by both sides: ``capture`` says which layers the
    forward captures and which supervision comes back (:class:`eagle3_client.capture.Capture`,
    agreed once per session in ``/session``, since it fixes the answer's shape); ``packed`` says
    the body carries packing metadata (:data:`PACKING_KEYS`). The wire body holds only tensors,
    so the per-request part is read from its keys (:meth:`from_keys`) and written as them
    (:attr:`keys`). Each extension names the capability a session must have been granted for
    it (:attr:`capabilities`). EAGLE-3, unpacked, is exactly upstream's request.
    """

    capture: Capture = EAGLE3  # the session's capture (EAGLE-3: upstream's aux layers and supervision)
    packed: bool = False  # the body carries PACKING_KEYS (documents packed into rows)
    # The vision tensors' names (a ViSpec, MSD or DSpark capture only), sorted: the server checks each
    # against its model's forward and refuses the request for any other (docs/vlm.md).
    vision: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        """The body's keys, in wire order."""
        return GENERATE_INPUT_KEYS + (PACKING_KEYS if self.packed else ()) + self.vision

    @property
    def capabilities(self) -> frozenset[str]:
        """The capabilities a session needs for this request."""
        return frozenset({CAPABILITY_PACKING} if self.packed else ())

    @classmethod
    def from_keys(cls, keys: Collection[str], capture: Capture = EAGLE3) -> GenerateRequest:
        """The request a body's keys describe under the session's ``capture``; ``ValueError`` naming
        a missing or unexpected key."""
        present = set(keys)
        packed = bool(present & set(PACKING_KEYS))
        vision: tuple[str, ...] = ()
        if capture.takes_vision:  # every other key is a vision tensor (its name checked by the server)
            if packed and capture.is_vlm:
                raise ValueError(f"a {capture.label} request carries no packing keys {list(PACKING_KEYS)}")
            vision = tuple(sorted(present - set(GENERATE_INPUT_KEYS) - set(PACKING_KEYS)))
            if packed and vision:
                raise ValueError(
                    f"a {capture.label} request carries vision tensors {list(vision)} or packing keys, not both"
                )
            if len(vision) > MAX_VISION_INPUTS:
                raise ValueError(f"{len(vision)} vision tensors {list(vision)}; at most {MAX_VISION_INPUTS}")
        request = cls(capture=capture, packed=packed, vision=vision)
        missing = [k for k in request.keys if k not in present]
        if missing:
            what = f"a packed request carries all of {list(PACKING_KEYS)}; " if request.packed else ""
            raise ValueError(f"missing keys {missing}; {what}expected {list(request.keys)}, got {sorted(present)}")
        extra = sorted(present - set(request.keys))
        if extra:
            raise ValueError(f"unexpected keys {extra}; expected {list(request.keys)}")
        return request


# Longest ``client`` name a session offer may carry (the server keeps it for the session's life).
MAX_CLIENT_NAME = 256


@dataclass(frozen=True)
class SessionOffer:
    """``POST /session`` body: who the client is and what it can do, best first (all optional)."""

    client: str = ""
    encoding: str = ENCODING_PROBS  # the encoding it prefers
    encodings: tuple[str, ...] = ()  # the others it can decode, best first
    data_planes: tuple[str, ...] = ()  # the tiers this process can join
    lease_seconds: float | None = None  # None: the server's default lease
    rejoin: bool = False  # the client takes this server back after it had left its rotation
    # What every /generate of the session captures (eagle3_client.capture); EAGLE-3 is not sent.
    capture: Capture = EAGLE3
    capabilities: tuple[str, ...] = ()  # request extensions it may use (CAPABILITIES)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "client": self.client,
            "encoding": self.encoding,
            "encodings": list(self.encodings),
            "data_planes": list(self.data_planes),
        }
        if self.lease_seconds is not None:
            body["lease_seconds"] = self.lease_seconds
        if self.rejoin:
            body["rejoin"] = True
        if not self.capture.is_eagle3:
            body[OFFER_KEY] = self.capture.to_json()
        if self.capabilities:  # sent only when asked for, so older servers see the old body
            body["capabilities"] = list(self.capabilities)
        return body

    @classmethod
    def from_json(cls, body: Any) -> SessionOffer:
        body = _object(body, "the session offer")
        client = str(_field(body, "client", (str, int, float), ""))
        if len(client) > MAX_CLIENT_NAME:
            raise ValueError(f"'client' must be at most {MAX_CLIENT_NAME} characters, got {len(client)}")
        return cls(
            client=client,
            encoding=_field(body, "encoding", str, ENCODING_PROBS),
            encodings=_names(body, "encodings"),
            data_planes=_names(body, "data_planes"),
            lease_seconds=_number(_field(body, "lease_seconds", (int, float), None)),
            rejoin=_field(body, "rejoin", bool, False),
            capture=_capture(body),
            capabilities=_names(body, "capabilities"),
        )


@dataclass(frozen=True)
class SessionReply:
    """``POST /session`` answer: the session's id and what the server agreed to."""

    session_id: str
    encoding: str = ENCODING_PROBS
    data_planes: tuple[str, ...] = (TIER_WIRE,)
    lease_seconds: float | None = None
    encoding_refused: str | None = None  # why the preferred encoding was not chosen
    protocol: int = PROTOCOL_VERSION
    model_fingerprint: str | None = None  # what the server serves (see ModelInfoExtension)
    # The server's --request-timeout: it answers every /generate (200, or 503 + Retry-After)
    # within this many seconds of admitting it, so a client may wait that long for the answer.
    request_timeout: float | None = None
    # The capture the server agreed to serve (echoed only when it is not EAGLE-3's).
    capture: Capture = EAGLE3
    # The offer's capabilities this server grants; absent from older servers (then none).
    capabilities: tuple[str, ...] = ()
    gpu_uuids: tuple[str, ...] = ()  # GPU_UUIDS_KEY: the GPU(s) of its NCCL end; absent from older servers
    # A ViSpec or MSD session: the token id the model's image placeholders carry (the client
    # derives the batch's image mask from it, as the co-located wrapper does); else absent.
    image_token_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "session_id": self.session_id,
            "protocol": self.protocol,
            "encoding": self.encoding,
            "data_plane": TIER_WIRE,  # every session starts on the wire
            "data_planes": list(self.data_planes),
            "lease_seconds": self.lease_seconds,
        }
        if self.encoding_refused:
            body["encoding_refused"] = self.encoding_refused
        if self.model_fingerprint:
            body["model_fingerprint"] = self.model_fingerprint
        if self.request_timeout is not None:
            body["request_timeout"] = self.request_timeout
        if not self.capture.is_eagle3:
            body[OFFER_KEY] = self.capture.to_json()
        if self.capabilities:
            body["capabilities"] = list(self.capabilities)
        if self.gpu_uuids:
            body[GPU_UUIDS_KEY] = list(self.gpu_uuids)
        if self.image_token_id is not None:
            body["image_token_id"] = self.image_token_id
        return body

    @classmethod
    def from_json(cls, body: Any) -> SessionReply:
        body = _object(body, "the session reply")
        return cls(
            session_id=_field(body, "session_id", str),
            encoding=_field(body, "encoding", str, ENCODING_PROBS),
            data_planes=_names(body, "data_planes") or (TIER_WIRE,),
            lease_seconds=_number(_field(body, "lease_seconds", (int, float), None)),
            encoding_refused=_field(body, "encoding_refused", str, None),
            protocol=_field(body, "protocol", int, PROTOCOL_VERSION),
            model_fingerprint=_field(body, "model_fingerprint", str, None),
            request_timeout=_number(_field(body, "request_timeout", (int, float), None)),
            capture=_capture(body),
            capabilities=_names(body, "capabilities"),
            gpu_uuids=_names(body, GPU_UUIDS_KEY),
            image_token_id=_field(body, "image_token_id", int, None),
        )


@dataclass(frozen=True)
class DataPlaneRequest:
    """``POST /data_plane`` body: the tier to bring up (``"wire"`` tears the session's group down).

    ``proof``: the client will prove on the group that it owns the session (it sends the
    reply's ``secret`` first); a server that knows this answers with a ``secret`` and sends
    nothing to a peer that does not. Sent only when true, so older servers see the old body.
    """

    tier: str
    proof: bool = False

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"tier": self.tier}
        if self.proof:
            body["proof"] = True
        return body

    @classmethod
    def from_json(cls, body: Any) -> DataPlaneRequest:
        body = _object(body, "the data-plane request")
        tier = _field(body, "tier", str)
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {list(TIERS)}, got {quote(tier)}")
        return cls(tier, proof=_field(body, "proof", bool, False))


@dataclass(frozen=True)
class DataPlaneReply:
    """``POST /data_plane`` answer: where to join the group, and how to recognise it."""

    tier: str
    port: int | None = None  # the server's rendezvous store (None for "wire")
    key: str | None = None  # the store-key prefix of the group
    nonce: int | None = None  # the sequence number of the hello transfer
    timeout: float | None = None  # seconds the server waits for the rendezvous
    secret: str | None = None  # hex; the client's first message on the group (only when it asked to prove)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"tier": self.tier}
        if self.tier != TIER_WIRE:
            body.update(port=self.port, key=self.key, nonce=self.nonce, timeout=self.timeout)
            if self.secret is not None:
                body["secret"] = self.secret
        return body

    @classmethod
    def from_json(cls, body: Any) -> DataPlaneReply:
        body = _object(body, "the data-plane reply")
        tier = _field(body, "tier", str)
        if tier == TIER_WIRE:
            return cls(tier)
        return cls(
            tier=tier,
            port=_field(body, "port", int),
            key=_field(body, "key", str),
            nonce=_field(body, "nonce", int),
            timeout=_number(_field(body, "timeout", (int, float), None)),
            secret=_field(body, "secret", str, None),
        )


@dataclass(frozen=True)
class ResendRequest:
    """``POST /data_plane/resend`` body: the transfer whose stored answer to send over the wire."""

    seq: int

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq}

    @classmethod
    def from_json(cls, body: Any) -> ResendRequest:
        return cls(_field(_object(body, "the resend request"), "seq", int))


@dataclass(frozen=True)
class ModelInfoExtension:
    """``/model_info``'s ``"eagle3"`` object, sent to registered sessions only (upstream's keys stay as they are).

    What a client needs to know about the served model beyond upstream's four keys.
    ``fingerprint`` identifies the served model (config, weights, dtype, aux layers, loader
    mode): servers that report the same one compute the same supervision.
    """

    model: str
    dtype: str
    device: str
    logits_size: int
    max_seq_len: int
    max_batch_tokens: int
    # How the target is placed: "single" (one device), "device_map" (layers over devices,
    # bit-exact) or "tp=N" (tensor parallel over N devices, within a documented tolerance).
    mode: str = "single"
    fingerprint: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "dtype": self.dtype,
            "device": self.device,
            "logits_size": self.logits_size,
            "max_seq_len": self.max_seq_len,
            "max_batch_tokens": self.max_batch_tokens,
            "mode": self.mode,
        }
        if self.fingerprint:
            body["fingerprint"] = self.fingerprint
        return body

    @classmethod
    def from_json(cls, body: Any) -> ModelInfoExtension:
        body = _object(body, "the model_info extension")
        return cls(
            model=_field(body, "model", str),
            dtype=_field(body, "dtype", str),
            device=_field(body, "device", str),
            logits_size=_field(body, "logits_size", int),
            max_seq_len=_field(body, "max_seq_len", int),
            max_batch_tokens=_field(body, "max_batch_tokens", int),
            mode=_field(body, "mode", str, "single"),  # absent from servers before it
            fingerprint=_field(body, "fingerprint", str, None),
        )


def _capture(body: Mapping[str, Any]) -> Capture:
    value = body.get(OFFER_KEY)
    return EAGLE3 if value is None else Capture.from_json(value)


def _number(value: int | float | None) -> float | None:
    return None if value is None else float(value)


# -- Streams (extension) ----------------------------------------------------------------------
# A producer has appliances compute a run's batches ahead of demand; each answer stays resident
# on the appliance that computed it (within its memory watermarks) until acknowledged, and a
# tensor-free reference (upstream's SampleRef, as StreamRef JSON) announces it on the run's
# queue. A trainer leases a reference from the queue and claims the answer from its appliance
# over the negotiated data plane, exactly as a /generate answer travels.
#
# POST /stream/produce: a /generate wire body plus SAMPLE_HEADER; the session's capture,
#   encoding and vocab mapping apply. The answer is computed and kept; the reply is StreamRef
#   JSON (store_uri "appliance://host:port"). A sample already kept is not computed again.
#   503 + STREAM_FULL_HEADER + Retry-After while the server's resident answers are at its
#   high watermark (until they fall below its low watermark).
# POST /generate with SAMPLE_HEADER and an empty body (a session granted CAPABILITY_STREAM):
#   the kept answer of that sample, on the session's data plane, with its request's tensors
#   (SAMPLE_INPUT_KEYS) beside the supervision; 404 naming the run or sample when none is kept,
#   409 when the session's capture or encoding differs from the answer's.
# POST /stream/release JSON {"run_id", "sample_ids": [...]}: drop those answers (acked).
# GET /stream/runs: the runs with resident answers; GET /stream/runs/<run>: its resident
#   sample ids; DELETE /stream/runs/<run>: drop them all (the run ended).
# /queue/<run>/<op> (QUEUE_OPS): the run's queue hosted by this appliance (appliance://).
SAMPLE_HEADER = "X-Eagle3-Sample"  # "<run_id>/<sample_id>"
STREAM_ID_MAX_LEN = 128
_STREAM_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{STREAM_ID_MAX_LEN}}}")
EP_STREAM_RELEASE = "stream/release"
EP_STREAM_RUNS = "stream/runs"
STREAM_FULL_HEADER = "X-Eagle3-Stream-Full"
# On /stream/produce: "1" lets the sample use the room kept free for it (--stream-reserve): a sample
# computed again after its appliance was lost, or the next sample of an in-order run.
PRIORITY_HEADER = "X-Eagle3-Priority"
EP_QUEUE = "queue"
QUEUE_OPS = ("open", "put", "acquire", "ack", "fail", "reclaim", "seal", "state", "samples", "end")
# What a kept answer carries of its request, beside its supervision, in this order (those of
# them the supervision does not already carry; packing keys only for packed rows).
SAMPLE_INPUT_KEYS = GENERATE_INPUT_KEYS + PACKING_KEYS
# Most ids one /stream/release or /queue/<run>/samples page names.
MAX_STREAM_IDS_PER_REQUEST = 10_000


def mapping_digest(selected_token_ids: Any) -> str:
    """A short digest of a draft vocabulary (its token ids, in order): a trainer whose own mapping
    differs from the run's is refused rather than trained on another vocabulary's probabilities."""
    text = ",".join(str(int(i)) for i in selected_token_ids.reshape(-1).tolist())
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def check_stream_id(value: Any, what: str) -> str:
    """A run or sample id: 1 to STREAM_ID_MAX_LEN letters, digits, '.', '_', ':' or '-' (ValueError naming ``what``)."""
    if not isinstance(value, str) or not _STREAM_ID.fullmatch(value):
        raise ValueError(
            f"{what} must be 1 to {STREAM_ID_MAX_LEN} letters, digits, '.', '_', ':' or '-', got {quote(value)}"
        )
    return value


def parse_sample_header(value: str) -> tuple[str, str]:
    """``(run_id, sample_id)`` of a SAMPLE_HEADER value (ValueError naming what is wrong)."""
    run_id, sep, sample_id = value.partition("/")
    if not sep:
        raise ValueError(f"{SAMPLE_HEADER} must be '<run_id>/<sample_id>', got {quote(value)}")
    return check_stream_id(run_id, "the run id"), check_stream_id(sample_id, "the sample id")


def queue_path(run_id: str, op: str) -> str:
    """The endpoint of ``op`` on ``run_id``'s appliance-hosted queue (no leading slash)."""
    if op not in QUEUE_OPS:
        raise ValueError(f"unknown queue operation {op!r}; expected one of {QUEUE_OPS}")
    return f"{EP_QUEUE}/{check_stream_id(run_id, 'the run id')}/{op}"


@dataclass(frozen=True)
class StreamRef:
    """Upstream's ``SampleRef`` as JSON (dtypes by name, e.g. ``"bfloat16"``): what a queue carries.

    ``feature_specs`` describe the tensors a consumer's store returns (the decoded supervision),
    as ``{name: [shape list, dtype name]}``; ``feature_keys`` map each to its name in the kept
    answer. ``target_model_version`` is the computing server's model fingerprint.
    """

    sample_id: str
    run_id: str
    store_uri: str
    feature_keys: dict[str, str]
    feature_specs: dict[str, tuple[tuple[int, ...], str]]
    algorithm: str
    schema_version: int
    num_tokens: int
    estimated_bytes: int
    target_model_version: str
    draft_weight_version: str = "0"

    def to_json(self) -> dict[str, Any]:
        return {
            "sample_id": self.sample_id,
            "run_id": self.run_id,
            "store_uri": self.store_uri,
            "feature_keys": dict(self.feature_keys),
            "feature_specs": {k: [list(shape), dtype] for k, (shape, dtype) in self.feature_specs.items()},
            "algorithm": self.algorithm,
            "schema_version": self.schema_version,
            "num_tokens": self.num_tokens,
            "estimated_bytes": self.estimated_bytes,
            "target_model_version": self.target_model_version,
            "draft_weight_version": self.draft_weight_version,
        }

    @classmethod
    def from_json(cls, body: Any) -> StreamRef:
        body = _object(body, "a sample reference")
        keys = _field(body, "feature_keys", dict)
        specs = _field(body, "feature_specs", dict)
        if len(specs) > 64 or set(keys) != set(specs):
            raise ValueError("'feature_keys' and 'feature_specs' must name the same features (at most 64)")
        parsed: dict[str, tuple[tuple[int, ...], str]] = {}
        for name, spec in specs.items():
            ok = (
                isinstance(spec, list)
                and len(spec) == 2
                and isinstance(spec[0], list)
                and len(spec[0]) <= 8
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in spec[0])
                and isinstance(spec[1], str)
                and len(spec[1]) <= 32
            )
            if not ok or not isinstance(keys[name], str):
                raise ValueError(f"feature {quote(name)}: a spec is [shape (list of ints >= 0), dtype name]")
            parsed[str(name)] = (tuple(spec[0]), spec[1])
        store_uri = _field(body, "store_uri", str)
        if "://" not in store_uri or len(store_uri) > 512:
            raise ValueError(f"'store_uri' must be a scheme://location URI, got {quote(store_uri)}")
        return cls(
            sample_id=check_stream_id(_field(body, "sample_id", str), "'sample_id'"),
            run_id=check_stream_id(_field(body, "run_id", str), "'run_id'"),
            store_uri=store_uri,
            feature_keys={str(k): v for k, v in keys.items()},
            feature_specs=parsed,
            algorithm=_field(body, "algorithm", str),
            schema_version=_field(body, "schema_version", int),
            num_tokens=_nonnegative(body, "num_tokens"),
            estimated_bytes=_nonnegative(body, "estimated_bytes"),
            target_model_version=_field(body, "target_model_version", str),
            draft_weight_version=str(_field(body, "draft_weight_version", str, "0")),
        )


def _nonnegative(body: Mapping[str, Any], key: str) -> int:
    value = _field(body, key, int)
    if value < 0:
        raise ValueError(f"{key!r} must be >= 0, got {value}")
    return int(value)


@dataclass(frozen=True)
class RunDescription:
    """What every sample of a run shares, fixed by the first producer that opens the run's queue.

    A later producer (or a restarted one) must describe the run the same way (409 otherwise),
    and the queue refuses a reference whose ``target_model_version`` is not ``model_fingerprint``.
    """

    algorithm: str  # Capture.algorithm: upstream's FeatureAlgorithm value, or "vispec" / "msd"
    capture: str  # eagle3_client.capture.Capture.spec() of the answers
    encoding: str  # the EAGLE-3 supervision encoding the answers are kept in ("probs" for DFlash)
    model_fingerprint: str
    visibility_timeout_s: float = 60.0  # how long a lease lives before its sample is delivered again
    draft_vocab_size: int | None = None  # EAGLE-3: the draft vocabulary (what topk:K decodes into)
    mapping_digest: str | None = None  # EAGLE-3: mapping_digest() of the draft vocabulary's token ids
    # ViSpec, MSD: the image placeholder id the appliances name in their session reply (the
    # loaders' image mask), so that a trainer reads it from the run, never from its own config.
    image_token_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "capture": self.capture,
            "encoding": self.encoding,
            "model_fingerprint": self.model_fingerprint,
            "visibility_timeout_s": self.visibility_timeout_s,
            "draft_vocab_size": self.draft_vocab_size,
            "mapping_digest": self.mapping_digest,
            "image_token_id": self.image_token_id,
        }

    @classmethod
    def from_json(cls, body: Any) -> RunDescription:
        body = _object(body, "a run description")
        timeout = float(_field(body, "visibility_timeout_s", (int, float), 60.0))
        if not 0 < timeout <= 86_400:
            raise ValueError(f"'visibility_timeout_s' must be in (0, 86400], got {timeout:g}")
        vocab = _field(body, "draft_vocab_size", int, None)
        digest = _field(body, "mapping_digest", str, None)
        if digest is not None and len(digest) > 128:
            raise ValueError("'mapping_digest' is at most 128 characters")
        image_token_id = _field(body, "image_token_id", int, None)
        if image_token_id is not None and image_token_id < 0:
            raise ValueError(f"'image_token_id' must be >= 0, got {image_token_id}")
        return cls(
            algorithm=_field(body, "algorithm", str),
            capture=_field(body, "capture", str),
            encoding=_field(body, "encoding", str),
            model_fingerprint=_field(body, "model_fingerprint", str),
            visibility_timeout_s=timeout,
            draft_vocab_size=vocab,
            mapping_digest=digest,
            image_token_id=image_token_id,
        )

    def differences(self, other: RunDescription) -> list[str]:
        """The fields (but the visibility timeout) in which ``other`` describes the run otherwise."""
        mine, theirs = self.to_json(), other.to_json()
        return [
            f"{key}: {quote(mine[key])} here, {quote(theirs[key])} asked"
            for key in mine
            if key != "visibility_timeout_s" and mine[key] != theirs[key]
        ]


@dataclass(frozen=True)
class LeaseJSON:
    """A lease as a queue hands it out: the reference, its lease id, and how long it is held."""

    ref: StreamRef
    lease_id: str
    visibility_timeout_s: float
    redelivery_count: int  # earlier deliveries of this sample (0 the first time)

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref.to_json(),
            "lease_id": self.lease_id,
            "visibility_timeout_s": self.visibility_timeout_s,
            "redelivery_count": self.redelivery_count,
        }

    @classmethod
    def from_json(cls, body: Any) -> LeaseJSON:
        body = _object(body, "a lease")
        return cls(
            ref=StreamRef.from_json(_field(body, "ref", dict)),
            lease_id=check_stream_id(_field(body, "lease_id", str), "'lease_id'"),
            visibility_timeout_s=float(_field(body, "visibility_timeout_s", (int, float))),
            redelivery_count=_nonnegative(body, "redelivery_count"),
        )


@dataclass(frozen=True)
class RunStateJSON:
    """A run's queue in numbers. ``closed``: sealed and every sample acked (loaders stop)."""

    run_id: str
    description: RunDescription
    sealed: bool
    total: int | None  # samples the producer announced at seal (None before)
    known: int  # distinct samples ever put
    pending: int
    leased: int
    acked: int
    redelivered: int  # deliveries after the first (expired or failed leases)
    recomputed: int  # puts that moved a sample not yet acked to another appliance
    closed: bool

    def to_json(self) -> dict[str, Any]:
        body = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "description"}
        body["description"] = self.description.to_json()
        return body

    @classmethod
    def from_json(cls, body: Any) -> RunStateJSON:
        body = _object(body, "a run state")
        return cls(
            run_id=_field(body, "run_id", str),
            description=RunDescription.from_json(_field(body, "description", dict)),
            sealed=_field(body, "sealed", bool),
            total=_field(body, "total", int, None),
            known=_nonnegative(body, "known"),
            pending=_nonnegative(body, "pending"),
            leased=_nonnegative(body, "leased"),
            acked=_nonnegative(body, "acked"),
            redelivered=_nonnegative(body, "redelivered"),
            recomputed=_nonnegative(body, "recomputed"),
            closed=_field(body, "closed", bool),
        )


@dataclass(frozen=True)
class SampleStatus:
    """One sample of a run's queue: ``state`` is "pending", "leased" or "acked"; where it is kept."""

    sample_id: str
    state: str
    store_uri: str

    def to_json(self) -> dict[str, Any]:
        return {"sample_id": self.sample_id, "state": self.state, "store_uri": self.store_uri}

    @classmethod
    def from_json(cls, body: Any) -> SampleStatus:
        body = _object(body, "a sample status")
        state = _field(body, "state", str)
        if state not in ("pending", "leased", "acked"):
            raise ValueError(f"'state' must be pending, leased or acked, got {quote(state)}")
        return cls(_field(body, "sample_id", str), state, _field(body, "store_uri", str))


@dataclass(frozen=True)
class ReleaseRequest:
    """``POST /stream/release``: drop these samples' kept answers (their leases were acked)."""

    run_id: str
    sample_ids: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "sample_ids": list(self.sample_ids)}

    @classmethod
    def from_json(cls, body: Any) -> ReleaseRequest:
        body = _object(body, "a release")
        ids = _names(body, "sample_ids")
        if len(ids) > MAX_STREAM_IDS_PER_REQUEST:
            raise ValueError(f"'sample_ids' names at most {MAX_STREAM_IDS_PER_REQUEST} samples, got {len(ids)}")
        return cls(
            check_stream_id(_field(body, "run_id", str), "'run_id'"),
            tuple(check_stream_id(i, "a sample id") for i in ids),
        )
