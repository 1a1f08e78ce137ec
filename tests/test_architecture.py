"""The layout is the architecture: packages do not reach back, and ``/generate`` flows one way."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import httpx

from eagle3_appliance.launch import ServerProcess
from eagle3_client import wire
from eagle3_client.synthetic import random_batch, vocab_mapping

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {
    "eagle3_appliance": REPO / "appliance" / "eagle3_appliance",
    "eagle3_client": REPO / "client" / "eagle3_client",
    "eagle3_loadtest": REPO / "loadtest" / "eagle3_loadtest",
}


def _modules() -> set[str]:
    return {
        package if path.stem == "__init__" else f"{package}.{path.stem}"
        for package, folder in PACKAGES.items()
        for path in folder.glob("*.py")
    }


def _imports(package: str) -> dict[str, set[str]]:
    """Module -> the first-party modules it imports anywhere (function bodies included).

    ``from pkg import mod`` counts as importing ``pkg.mod`` (the packages' ``__init__`` only
    re-exports lazily), ``from pkg.mod import name`` as importing ``pkg.mod``.
    """
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGES[package].glob("*.py")):
        name = package if path.stem == "__init__" else f"{package}.{path.stem}"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_server_package_has_no_import_cycle() -> None:
    graph = _imports("eagle3_appliance")
    assert len(graph) > 20
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_client_and_loadtest_packages_have_no_import_cycle() -> None:
    for package in ("eagle3_client", "eagle3_loadtest"):
        assert _cycle(_imports(package)) is None, package


def test_the_client_never_imports_the_server() -> None:
    for package in ("eagle3_client", "eagle3_loadtest"):
        for module, imported in _imports(package).items():
            assert not [m for m in imported if m.startswith("eagle3_appliance")], module


# The modules of the /generate steps, in the order a request must reach them (see
# eagle3_appliance.pipeline). The orchestrator (pipeline) and the shared plumbing (state,
# sessions, admission, metrics, buffers, inputs, errors, operations, ...) are not steps.
STEPS = ["server", "validation", "target", "supervision", "projection", "transfer"]

_TRACER = """
import atexit, json, os, sys, threading
calls, watching, entered = [], [False], {}
def profile(frame, event, arg):
    if event != "call":
        return
    module = frame.f_globals.get("__name__", "")
    if not module.startswith("eagle3_appliance."):
        return
    if id(frame) in entered and entered[id(frame)] is frame:
        return  # a coroutine resumed after an await: not a new visit
    entered[id(frame)] = frame
    name = frame.f_code.co_name
    if module == "eagle3_appliance.server" and name == "generate":
        watching[0] = True  # the /generate handler starts
    elif module == "eagle3_appliance.operations" and name == "responded" and watching[0]:
        watching[0] = False  # its response is complete
        calls.append(None)
    if watching[0]:
        calls.append((module.rsplit(".", 1)[1], name))
sys.setprofile(profile)
threading.setprofile(profile)
atexit.register(lambda: open(os.environ["EAGLE3_TRACE"], "w").write(json.dumps(calls)))
sys.argv = ["eagle3-appliance", *sys.argv[1:]]
from eagle3_appliance.cli import main
main()
"""


def test_a_generate_request_visits_each_step_module_once_in_order(tmp_path: Path, cache_dir: Path) -> None:
    trace = tmp_path / "trace.json"
    script = tmp_path / "traced_server.py"
    script.write_text(_TRACER)
    launcher = (sys.executable, str(script))  # the same CLI, started under the tracer
    with ServerProcess(["--cache-dir", str(cache_dir)], env={"EAGLE3_TRACE": str(trace)}, launcher=launcher) as server:
        ids, mask = vocab_mapping(1024, 64)
        body = wire.encode({"selected_token_ids": ids, "selected_token_mask": mask})
        headers = {"Content-Type": "application/octet-stream"}
        assert httpx.post(server.url + "/set_vocab_mapping", content=body, headers=headers).status_code == 200
        inputs = dict(zip(("input_ids", "attention_mask", "loss_mask"), random_batch(1024, 2, 16, seed=0), strict=True))
        resp = httpx.post(server.url + "/generate", content=wire.encode(inputs), headers=headers, trust_env=False)
        assert resp.status_code == 200
    calls = json.loads(trace.read_text())
    first_request = calls[: calls.index(None)]
    visited = [m for m, fn in first_request if m in STEPS and not fn.startswith("__")]
    collapsed = [m for i, m in enumerate(visited) if i == 0 or visited[i - 1] != m]
    assert collapsed == STEPS, [f"{m}.{fn}" for m, fn in first_request if m in STEPS]
