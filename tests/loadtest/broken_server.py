"""A deliberately wrong target server: the right protocol and wire format, wrong answers.

It speaks just enough of the upstream protocol for the load test's ranks (no sessions:
``POST /session`` is 404, like an upstream server) and answers ``/generate`` with random
supervision that is correct in every checked respect except what the mode breaks. The
mode is the first path segment, so one server serves all of them (point Locust's
``--host`` at ``http://127.0.0.1:PORT/<mode>``):

* ``ok``      nothing (the control: the steady scenario must pass against it);
* ``probs``   probability rows sum to 0.5;
* ``shapes``  ``target_probs`` is one position short.

Usage::

    python tests/loadtest/broken_server.py --port 8123
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from eagle3_client import protocol, wire

HIDDEN_SIZE, VOCAB_SIZE, NUM_LAYERS = 8, 512, 4
MODES = ("ok", "probs", "shapes")


def _shift(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((x[:, 1:], torch.zeros_like(x[:, :1])), dim=1)


def supervision(request: dict[str, Any], draft_vocab: int, mode: str) -> dict[str, torch.Tensor]:
    input_ids, loss_mask = request["input_ids"], request["loss_mask"]
    batch, seq_len = input_ids.shape
    probs = torch.softmax(torch.randn(batch, seq_len, draft_vocab), dim=-1)
    if mode == "probs":
        probs = probs * 0.5
    if mode == "shapes":
        probs = probs[:, :-1].contiguous()
    shifted_loss = _shift(loss_mask)
    return {
        "aux_hidden_states": torch.randn(batch, seq_len, 3 * HIDDEN_SIZE),
        "target_probs": probs,
        "position_mask": (shifted_loss.bool() & (torch.rand(batch, seq_len) < 0.5)).unsqueeze(-1),
        "input_ids": _shift(input_ids),
        "loss_mask": shifted_loss,
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: BrokenServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def _send(self, status: int, body: bytes, content_type: str = protocol.JSON) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), protocol.JSON)

    def do_GET(self) -> None:
        if self.path == protocol.path(protocol.EP_HEALTH):
            self._json(200, {"status": "ok"})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        mode, _, endpoint = self.path.strip("/").partition("/")
        if mode not in MODES:
            self._json(404, {"error": f"unknown mode {mode!r}; use one of {MODES}"})
            return
        if endpoint == protocol.EP_MODEL_INFO:
            info = {"num_hidden_layers": NUM_LAYERS, "hidden_size": HIDDEN_SIZE, "vocab_size": VOCAB_SIZE}
            self._json(200, {**info, "aux_layer_ids": [0, 1, 2]})
        elif endpoint == protocol.EP_SET_VOCAB_MAPPING:
            self.server.draft_vocab[mode] = int(wire.decode(body)["selected_token_ids"].numel())
            self._json(200, {"status": "ok"})
        elif endpoint == protocol.EP_GENERATE:
            if mode not in self.server.draft_vocab:
                self._json(409, {"error": "no vocab mapping"})
                return
            answer = supervision(wire.decode(body), self.server.draft_vocab[mode], mode)
            self._send(200, wire.encode(answer), protocol.OCTET_STREAM)
        elif endpoint in (protocol.EP_HEARTBEAT, protocol.EP_DISCONNECT):
            self._json(200, {"status": "ok"})
        else:
            self._json(404, {"error": "not found"})


class BrokenServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.draft_vocab: dict[str, int] = {}  # per mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with BrokenServer(args.port) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
