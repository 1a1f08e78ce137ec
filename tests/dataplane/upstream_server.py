"""A stand-in for an unmodified upstream target server, written from upstream-protocol.md.

It knows only upstream's endpoints (everything else is 404, so ``/session`` and
``/data_plane`` are unknown to it), computes the supervision with the same in-process
target, and appends every request path to a log file so that a test can see what a
client asked for. Like an upstream server with NCCL, its ``/init_nccl`` blocks on a
rendezvous (here one that never completes) before it answers "failed".

Usage: ``python upstream_server.py PORT CACHE_DIR PATH_LOG``
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.supervision import in_process
from eagle3_appliance.settings import Settings
from eagle3_client import wire

INIT_NCCL_BLOCK_S = 30.0


def main(port: int, cache_dir: str, path_log: str) -> None:
    target = load_target(Settings(cache_dir=Path(cache_dir)))
    lock = threading.Lock()  # upstream serialises generate and set_vocab_mapping
    state: dict[str, VocabMapping] = {}
    log = open(path_log, "a", buffering=1)  # noqa: SIM115 - lives as long as the server

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            return

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj: object, status: int = 200) -> None:
            self._reply(status, json.dumps(obj).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            log.write(f"GET {self.path}\n")
            if self.path.lstrip("/") == "health":
                self._json({"status": "ok"})
            else:
                self._json({"error": "not found"}, 404)

        def do_POST(self) -> None:  # noqa: N802 - http.server API
            endpoint = self.path.lstrip("/")
            log.write(f"POST {self.path} nccl={self.headers.get('X-NeMo-NCCL')}\n")
            body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
            if endpoint == "model_info":
                self._json(target.model_info())
            elif endpoint == "input_embeddings":
                self._reply(200, wire.encode({"weight": target.input_embeddings}), "application/octet-stream")
            elif endpoint == "set_vocab_mapping":
                t = wire.decode(body)
                with lock:
                    state["mapping"] = VocabMapping(t["selected_token_ids"], t["selected_token_mask"].bool())
                self._json({"status": "ok"})
            elif endpoint == "generate":
                t = wire.decode(body)
                with lock:
                    out = in_process(
                        target, GenerateInputs(t["input_ids"], t["attention_mask"], t["loss_mask"]), state["mapping"]
                    )
                self._reply(200, wire.encode(out), "application/octet-stream")
            elif endpoint == "init_nccl":
                time.sleep(INIT_NCCL_BLOCK_S)  # a rendezvous that never completes
                self._json({"status": "failed"})
            elif endpoint in ("heartbeat", "disconnect"):
                self._json({"status": "ok"})
            else:
                self._json({"error": "not found"}, 404)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
