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


def _module_name(package: str, path: Path) -> str:
    parts = path.relative_to(PACKAGES[package]).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((package, *parts))


def _modules() -> set[str]:
    return {_module_name(package, path) for package, folder in PACKAGES.items() for path in folder.rglob("*.py")}


def _imports(package: str) -> dict[str, set[str]]:
    """Module -> the first-party modules it imports anywhere (function bodies included).

    ``from pkg import mod`` counts as importing ``pkg.mod`` (the packages' ``__init__`` only
    re-exports lazily), ``from pkg.mod import name`` as importing ``pkg.mod``.
    """
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGES[package].rglob("*.py")):
        name = _module_name(package, path)
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


# The rooms of each package, top first: a level holds one room or several sibling rooms, and a
# room is a subpackage or a group of top-level modules (``__init__`` is the package itself). A
# module may import its own room and the levels below; sibling rooms never import each other.
LAYERS: dict[str, list[dict[str, set[str]]]] = {
    "eagle3_appliance": [
        {"entry points": {"cli", "__main__", "demo", "sizes", "launch", "produce", "produce_recipe"}},
        {"serving": {"serving"}},  # the HTTP face and the /generate flow
        # stream: answers kept for a run's stream and the queue an appliance hosts (plain state)
        {"dataplanes": {"dataplanes"}, "model": {"model"}, "ops": {"ops"}, "stream": {"stream"}},
        {"core": {"core"}},  # the request types every room shares
        {"ground": {"settings", "errors", "progress", "__init__"}},
    ],
    "eagle3_client": [
        {
            "public names and the recipe hook": {
                "__init__",
                "automodel",
                "automodel_launch",
                "automodel_packing",
                "automodel_stream",
                "automodel_stream_dflash",
            }
        },
        # the recipes' surfaces, and the stream's queue + store (upstream's streaming API)
        {"adapters": {"backend", "dflash", "dspark", "eagle", "vlm", "vispec", "msd"}, "streaming": {"streaming"}},
        {"remote": {"remote"}},  # the generic core: sessions, fleet, requests
        {"transports": {"transports"}},  # how bytes travel
        {
            "ground": {
                "protocol",
                "quoting",
                "capture",
                "wire",
                "encodings",
                "errors",
                "options",
                "auth",
                "contract",
                "synthetic",
            }
        },
    ],
}


def _place(package: str, module: str) -> tuple[int, str]:
    """(level, room) of ``module``; KeyError for a module no room names."""
    parts = module.split(".")
    member = parts[1] if len(parts) > 1 else "__init__"
    for level, rooms in enumerate(LAYERS[package]):
        for room, members in rooms.items():
            if member in members:
                return level, room
    raise KeyError(module)


def _violations(package: str, graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for every import of a level above, or of a sibling room."""
    bad = []
    for module, imported in graph.items():
        here = _place(package, module)
        for other in imported:
            if other.split(".")[0] != package:
                continue
            there = _place(package, other)
            if there != here and there[0] <= here[0]:
                bad.append(f"{module} -> {other}")
    return sorted(bad)


def test_every_module_lives_in_a_named_room() -> None:
    for package in LAYERS:
        for module in _imports(package):
            _place(package, module)  # raises for a module outside every room


def test_rooms_import_only_downwards() -> None:
    for package in LAYERS:
        assert _violations(package, _imports(package)) == [], package


def test_the_layering_check_refuses_an_upward_or_sideways_import() -> None:
    graph = _imports("eagle3_appliance")
    graph["eagle3_appliance.model.target"] = graph["eagle3_appliance.model.target"] | {
        "eagle3_appliance.serving.pipeline",  # upwards
        "eagle3_appliance.ops.metrics",  # a sibling
    }
    assert _violations("eagle3_appliance", graph) == [
        "eagle3_appliance.model.target -> eagle3_appliance.ops.metrics",
        "eagle3_appliance.model.target -> eagle3_appliance.serving.pipeline",
    ]
    client = _imports("eagle3_client")
    client["eagle3_client.transports.control"] = client["eagle3_client.transports.control"] | {"eagle3_client.backend"}
    assert _violations("eagle3_client", client) == ["eagle3_client.transports.control -> eagle3_client.backend"]


def test_each_subpackage_says_what_it_is_for_and_what_it_may_import() -> None:
    for folder in PACKAGES.values():
        for init in folder.glob("*/__init__.py"):
            doc = ast.get_docstring(ast.parse(init.read_text())) or ""
            assert "May import" in doc and len(doc.splitlines()) >= 3, init


# The modules of the /generate steps, in the order a request must reach them (see
# eagle3_appliance.serving.pipeline). The orchestrator (pipeline) and the shared plumbing (state,
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
    if module == "eagle3_appliance.serving.server" and name == "generate":
        watching[0] = True  # the /generate handler starts
    elif module == "eagle3_appliance.serving.operations" and name == "responded" and watching[0]:
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
