"""``RemoteEagle3TargetModel``: the EAGLE-3 recipe's target backend, served by remote appliances.

A thin adapter over :class:`eagle3_client.remote.core.RemoteTarget` (servers, fleet,
sessions, async requests): it adds the draft-vocabulary mapping, encodes the recipe's batch
and decodes each answer into the recipe's ``Eagle3TargetBatch``.

Several requests per server (``max_in_flight_per_server``, default 2): a server runs one
forward at a time, but while one answer travels back the next forward can run, so a second
request in flight keeps the server busy. The data planes keep that correct (each wire answer
has its own HTTP exchange; group transfers are received in the order the server sends them,
see :mod:`eagle3_client.transports.group_plane`). Several servers form a fleet
(:mod:`eagle3_client.remote.fleet`): load-aware routing, failover, readiness probes, one model
per fleet, an elastic server list.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eagle3_client import protocol, wire
from eagle3_client.contract import Eagle3TargetBackend, Eagle3TargetBatch
from eagle3_client.encodings import EncodingStats, decode_supervision, detect_encoding
from eagle3_client.errors import ProtocolViolation
from eagle3_client.remote.core import RemoteResult, RemoteTarget
from eagle3_client.remote.fleet import is_server_failure
from eagle3_client.remote.request import Packing
from eagle3_client.remote.session import ServerSession
from eagle3_client.transports.dataplane import Answer

__all__ = ["RemoteEagle3TargetModel", "RemoteResult"]

_MAPPINGS_KEPT = 8  # vocab mappings whose answers can still be decoded (far more than can be in flight)


class RemoteEagle3TargetModel(RemoteTarget, Eagle3TargetBackend):
    """EAGLE-3 target backend whose forward passes run on remote target appliances.

    Usage::

        target = RemoteEagle3TargetModel.from_urls(["http://node3:8001"], device="cuda", data_plane="auto")
        target.set_vocab_mapping(selected_token_ids, selected_token_mask)
        batch = target.generate_batch(input_ids, attention_mask, loss_mask)
        target.close()

    Options are keyword arguments, each with an environment variable that supplies its
    default (:class:`eagle3_client.options.ClientOptions`, and the docs' client option table):
    ``data_plane`` (``auto`` picks the fastest tier both ends support: nccl for a GPU trainer,
    else the wire; a named tier is forced and raises ``DataPlaneUnavailable`` if the pair
    cannot do it),
    ``encoding``, ``token``, ``lease_seconds`` (asks our servers for this session lease; the
    client heartbeats three times per lease, and a server frees a session that went silent
    for longer, e.g. a killed trainer), timeouts and retries, and the fleet's options
    (``max_in_flight_per_server``, ``failover_timeout``, the probe intervals, ``server_list``).

    Several servers form a fleet (:mod:`eagle3_client.remote.fleet`): a request goes to the server
    expected to finish it first, fails over to another when its server fails, and a failed
    server is probed and taken back once ready. Every server must serve the same model: the
    first call connects them all and raises :class:`~eagle3_client.errors.ModelMismatch` if
    their fingerprints differ.

    Memory: answers are received into a :class:`eagle3_client.transports.buffers.BufferPool` (at
    most ``buffer_pool_mb``, default ``$EAGLE3_CLIENT_POOL_MB`` or 2 GiB). On a CUDA device
    those are pinned staging buffers, copied to the device before ``generate_batch``
    returns. On the CPU the batch's tensors *are* pool memory: it is reused only after
    every reference to the batch is gone, so keeping a batch is always safe.
    """

    def __init__(
        self,
        urls: Sequence[str] | str | os.PathLike[str] | None,
        *,
        device: torch.device | str = "cpu",
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> None:
        # Vocab mappings by version (the newest last); "hidden" answers are decoded with the
        # LM-head rows of the mapping the server names on the answer, never a newer one.
        # Set before the core builds the fleet: _prepare_server reads them.
        self._mappings: collections.OrderedDict[int, _Mapping] = collections.OrderedDict()
        self._mapping_version = 0
        self._rows_lock = threading.Lock()
        self._stats = EncodingStats()
        self._stats_lock = threading.Lock()
        super().__init__(urls, device=device, headers=headers, **options)

    def _prepare_server(self, server: ServerSession) -> None:
        if self._mappings:  # a server the list adds later gets the current mapping when it joins
            current = next(reversed(self._mappings.values()))
            server.mapping = (current.payload, current.version)

    @classmethod
    def from_urls(
        cls,
        urls: Sequence[str] | str | os.PathLike[str] | None,
        *,
        device: torch.device | str = "cpu",
        **options: Any,
    ) -> RemoteEagle3TargetModel:
        """Upstream's constructor (``timeout=120``, ``max_retries=3``); every other option is ours.

        ``urls`` is a list of server URLs, a comma-separated string, or the path of a file
        with one URL per line, which the client re-reads when it changes (as with
        ``server_list`` / ``$EAGLE3_SERVER_LIST``, used when ``urls`` is empty).

        ``encoding`` (default ``$EAGLE3_ENCODING``, else ``"probs"``) picks how supervision
        travels: ``probs``, ``logits``, ``hidden`` or the lossy ``topk:K``. The batches the
        recipe gets have the same fields, dtypes and devices whatever is chosen.
        """
        return cls(urls, device=device, **options)

    # -- the Eagle3TargetBackend contract ----------------------------------------------

    def set_vocab_mapping(self, selected_token_ids: torch.Tensor, selected_token_mask: torch.Tensor) -> None:
        """Send the draft-vocabulary mapping to every server (each computes the projection).

        Each mapping gets a version that our servers name on every answer computed under it,
        so a batch in flight while the mapping changes is decoded entirely under the mapping
        it was computed with. A server out of the rotation gets it when it comes back.
        """
        draft_vocab = int(selected_token_ids.numel())
        if self._encoding.k is not None and self._encoding.k > draft_vocab:
            raise ValueError(f"encoding {self._encoding.name} needs K <= the draft vocabulary size {draft_vocab}")
        payload = wire.encode({"selected_token_ids": selected_token_ids, "selected_token_mask": selected_token_mask})
        self._fleet.start()
        with self._rows_lock:
            self._mapping_version += 1
            mapping = _Mapping(
                self._mapping_version, selected_token_ids.detach().to("cpu", torch.int64).contiguous(), payload
            )
            self._mappings[mapping.version] = mapping
            while len(self._mappings) > _MAPPINGS_KEPT:
                self._mappings.popitem(last=False)
        accepted, failed = 0, []
        for member in self._fleet.members:
            try:
                member.server.set_vocab_mapping(payload, mapping.version)
            except Exception as exc:
                if not is_server_failure(exc):
                    raise
                failed.append(exc)
                self._fleet.fail(member, exc)  # it gets the mapping when it is back
            else:
                accepted += not member.server._left
        if not accepted and failed:
            raise failed[-1]
        if any(s.encoding.kind == protocol.ENCODING_HIDDEN for s in self._servers if s._connected):
            self._rows_for(mapping)  # fetch the rows now rather than in the first batch

    def encoding_stats(self) -> dict[str, Any]:
        """The requested encoding, what each server agreed to, batches per encoding, topk's kept mass."""
        with self._stats_lock:
            stats = self._stats.as_dict()
        negotiated = {s.control.url: s.encoding.name if s._generation else None for s in self._servers}
        return {"requested": self._encoding.name, "negotiated": negotiated, **stats}

    # -- decoding ----------------------------------------------------------------------

    def _mapping_for(self, version: int | None) -> _Mapping | None:
        """The mapping an answer was computed under (the newest when the server names none)."""
        with self._rows_lock:
            if version is None:
                return next(reversed(self._mappings.values())) if self._mappings else None
            mapping = self._mappings.get(version)
        if mapping is None:
            raise ProtocolViolation(f"an answer names vocab mapping {version}, which this client does not hold")
        return mapping

    def _rows_for(self, mapping: _Mapping | None) -> torch.Tensor:
        """``lm_head.weight[selected_token_ids]`` of ``mapping`` on our device, fetched once per mapping.

        All servers of one client serve the same model (the fleet checks it), so any of them
        gives the rows, and one copy serves answers from all of them.
        """
        if mapping is None:
            raise RuntimeError("call set_vocab_mapping before generate_batch")
        with self._rows_lock:
            if mapping.rows is None:
                ids = mapping.draft_ids
                payload = wire.encode({"selected_token_ids": ids})
                tensors = self._any(lambda s: s.control.post_wire(protocol.EP_LM_HEAD_ROWS, payload))
                weight = tensors.get("weight")
                if weight is None or weight.ndim != 2 or weight.shape[0] != ids.numel():
                    got = None if weight is None else list(weight.shape)
                    raise ProtocolViolation(
                        f"/{protocol.EP_LM_HEAD_ROWS} returned weight {got}, expected [{ids.numel()}, hidden_size]"
                    )
                mapping.rows = weight.to(self._device)
            return mapping.rows

    def _to_batch(
        self,
        answer: Answer,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        packing: Packing | None,
    ) -> Any:
        """Upstream's ``Eagle3TargetBatch``; ``input_ids`` and ``loss_mask`` come back in the answer."""
        # The one copy to the trainer's device (in decode_supervision); blocking, so the pinned
        # staging buffers are free for the next answer as soon as this returns.
        dev = self._device
        result = answer.tensors
        encoding = detect_encoding(result)  # what the server actually sent (checked against its header)
        mapping = self._mapping_for(answer.mapping_version)
        draft_vocab = None if mapping is None else int(mapping.draft_ids.numel())
        decoded = decode_supervision(
            result, encoding, device=dev, draft_vocab=draft_vocab, lm_head_rows=lambda: self._rows_for(mapping)
        )
        with self._stats_lock:
            self._stats.record(encoding, decoded)
        return Eagle3TargetBatch(
            aux_hidden_states=result["aux_hidden_states"].to(dev),
            input_ids=result["input_ids"].to(dev),
            attention_mask=attention_mask.to(dev),
            loss_mask=result["loss_mask"].to(dev),
            target_probs=decoded.target_probs,
            position_mask=decoded.position_mask,
            **({} if packing is None else packing.on(dev)),
        )


@dataclass(eq=False)
class _Mapping:
    """One vocab mapping as sent: its version, draft ids, wire payload and (for "hidden") LM-head rows."""

    version: int
    draft_ids: torch.Tensor
    payload: bytes
    rows: torch.Tensor | None = None
