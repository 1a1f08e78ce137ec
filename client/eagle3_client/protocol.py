"""The remote-target protocol: endpoint names, headers, keys and limits shared by both sides.

This module and :mod:`eagle3_client.wire` are the only places where the protocol is spelled out;
the appliance imports them, so a change here changes both ends at once. Everything in the
upstream column of ``shared/design/upstream-protocol.md`` is reproduced exactly; what we add
(marked *extension*) is only ever used after the peer has said it understands it.
"""

from __future__ import annotations

__all__ = [
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
    "EP_GPUS",
    "EP_LM_HEAD_ROWS",
    "SESSION_HEADER",
    "ENCODING_HEADER",
    "AUTH_HEADER",
    "ENV_ENABLE_NCCL",
    "ENV_NCCL_PORT",
    "ENV_DATA_PLANE",
    "ENV_DATA_PLANE_BACKOFF",
    "ENV_DATA_PLANE_CONNECT_TIMEOUT",
    "ENV_DATA_PLANE_TIMEOUT",
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
# Sent by our client on every request once it has a session; requests without it belong
# to the anonymous session that upstream clients share.
SESSION_HEADER = "X-Eagle3-Session"
# The supervision encoding a /generate answer uses (absent = upstream's "probs").
ENCODING_HEADER = "X-Eagle3-Encoding"
AUTH_HEADER = "Authorization"  # "Bearer <token>" when the server is started with a token

# Data planes (extension). How a /generate answer's tensors travel, best first: a private
# two-rank torch.distributed group over NCCL (GPU to GPU) or gloo (CPU sockets), else the
# HTTP body ("wire", upstream's fallback, always available). The client lists the tiers it
# can do in its POST /session offer ("data_planes"); the reply lists what the server offers.
TIER_NCCL = "nccl"
TIER_GLOO = "gloo"
TIER_WIRE = "wire"
TIERS = (TIER_NCCL, TIER_GLOO, TIER_WIRE)
# POST JSON {"tier": "nccl"|"gloo"} -> {"tier", "port", "key", "nonce", "timeout"}: the server
# (rank 0) hosts a TCP store on "port", keeps the group's keys under the secret prefix "key/"
# and sends a zero-tensor hello whose sequence number is "nonce".
# {"tier": "wire"} tears the session's group down. GET -> status of every group (JSON).
EP_DATA_PLANE = "data_plane"
# POST JSON {"seq": n} -> the session's stored result of transfer n as a wire blob (no
# recompute); RESEND_CONFLICT_STATUS when the server holds no result for n.
EP_DATA_PLANE_RESEND = "data_plane/resend"
RESEND_CONFLICT_STATUS = 409
# On /generate: the client names the transfer (its sequence number); the server echoes it
# when the body is transfer metadata (JSON) and the tensors follow on the group. Without
# the echo the body is a wire blob, exactly as for upstream's X-NeMo-NCCL.
TRANSFER_HEADER = "X-Eagle3-Transfer"
# First int64 of the header tensor of every group transfer: [magic, seq, n_tensors, bytes].
TRANSFER_MAGIC = 0x45334450  # "E3DP"
# Client-side knobs (the keyword arguments of RemoteEagle3TargetModel default to these).
ENV_DATA_PLANE = "EAGLE3_DATA_PLANE"  # auto | nccl | gloo | wire
ENV_DATA_PLANE_TIMEOUT = "EAGLE3_DATA_PLANE_TIMEOUT"  # seconds per group transfer
ENV_DATA_PLANE_CONNECT_TIMEOUT = "EAGLE3_DATA_PLANE_CONNECT_TIMEOUT"  # seconds to join a group
ENV_DATA_PLANE_BACKOFF = "EAGLE3_DATA_PLANE_BACKOFF"  # seconds before the first re-upgrade

# Content types.
OCTET_STREAM = "application/octet-stream"
JSON = "application/json"

# The client offers NCCL with ``X-NeMo-NCCL: 1``; the server echoes it when the body is
# NCCL metadata instead of a wire blob.
NCCL_HEADER = "X-NeMo-NCCL"

# Upstream's NCCL rendezvous knobs (read by both ends).
ENV_NCCL_PORT = "NEMO_EAGLE_NCCL_PORT"
ENV_ENABLE_NCCL = "NEMO_EAGLE_ENABLE_NCCL"
# Upstream builds its group through torch's group helper under this name (+ the port), so
# the NCCL unique id sits in the rendezvous store under "<prefix><port>/cuda/".
UPSTREAM_NCCL_GROUP_PREFIX = "nemo_eagle_target_transfer_"

# Keys of the /generate request and of its response, in wire order.
GENERATE_INPUT_KEYS = ("input_ids", "attention_mask", "loss_mask")
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
