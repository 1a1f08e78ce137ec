"""Run NeMo AutoModel's own remote-target server, unmodified, on a local model (a test fixture).

Upstream's CLI (``serve_target``) loads the target through ``NeMoAutoModelForCausalLM``, which
refuses to run without CUDA, so this script loads the same checkpoint with transformers (what
that loader does for a plain HF Llama) and hands it to upstream's ``HFEagle3TargetModel``,
``TargetModelServer`` and ``serve``, exactly as ``serve_target.main`` does. The server exits
by itself when a client posts ``/disconnect``. Usage::

    python tests/integration/upstream_server.py --model DIR --port 8001
"""

from __future__ import annotations

import argparse
import logging

import torch
from nemo_automodel.components.speculative.eagle.remote.server import TargetModelServer, serve
from nemo_automodel.components.speculative.eagle.target import HFEagle3TargetModel
from transformers import AutoModelForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).requires_grad_(False)
    server = TargetModelServer(HFEagle3TargetModel(model), nccl_port=args.port + 100, host=args.host)
    serve(server, args.host, args.port)


if __name__ == "__main__":
    main()
