"""Our client is what NeMo AutoModel's EAGLE-3 recipe expects of a target backend.

Checked with the recipe's own code: upstream's ``Eagle3TargetBackend``/``Eagle3TargetBatch``
types, the recipe's prefetch depth resolution and its prefetch iterator
(``TrainEagle3Recipe._prefetched_batches``) at depth 1 and 2 (and, through our hook, at
servers x requests in flight), and the hook that makes the recipe construct our client.
"""

from __future__ import annotations

import inspect
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from eagle3_client import RemoteEagle3TargetModel
from eagle3_client.automodel import configured_backend, install, options_from_config
from eagle3_client.options import ClientOptions, option_fields, recipe_key
from eagle3_client.synthetic import random_batch, vocab_mapping
from tests.integration.automodel_support import (
    PYTHON,
    colocated_supervision,
    import_or_skip,
    load_colocated,
    python_env,
)
from tests.oracle import assert_bit_exact

upstream_backend = import_or_skip("nemo_automodel.components.speculative.eagle.backend")
upstream_target = import_or_skip("nemo_automodel.components.speculative.eagle.target")
upstream_core = import_or_skip("nemo_automodel.components.speculative.eagle.core")
upstream_remote = import_or_skip("nemo_automodel.components.speculative.eagle.remote")
recipe_module = import_or_skip("nemo_automodel.recipes.llm.train_eagle3")

VOCAB = 1024


@pytest.fixture(scope="module")
def servers(appliances: list[ServerProcess]) -> list[ServerProcess]:
    return appliances


@pytest.fixture(scope="module")
def colocated(model_dir: Path) -> object:
    return load_colocated(model_dir)


def test_our_client_is_upstreams_backend_and_returns_its_batch(servers: list[ServerProcess], colocated: object) -> None:
    ids, mask = vocab_mapping(VOCAB, 300, seed=5)
    inputs = random_batch(VOCAB, 2, 20, seed=5, pad=True)
    with RemoteEagle3TargetModel.from_urls([servers[0].url], device="cpu") as remote:
        assert isinstance(remote, upstream_backend.Eagle3TargetBackend)
        assert remote.supports_async and remote.num_remote_servers == 1
        remote.set_vocab_mapping(ids, mask)
        batch = remote.generate_batch(*inputs)
    assert type(batch) is upstream_target.Eagle3TargetBatch
    # The precomputed encoding, and exactly the keyword arguments upstream's trainer accepts.
    assert batch.logits is None
    trainer_inputs = batch.to_trainer_inputs()
    assert set(trainer_inputs) == {
        "input_ids",
        "attention_mask",
        "loss_mask",
        "aux_hidden_states",
        "target_probs",
        "position_mask",
    }
    assert set(trainer_inputs) <= set(inspect.signature(upstream_core.Eagle3TrainerModule.forward).parameters)
    assert_bit_exact(batch, colocated_supervision(colocated, inputs, ids, mask))


def _bare_recipe(backend: object, depth: int) -> object:
    """A ``TrainEagle3Recipe`` holding only what its prefetch code reads (the backend, the depth)."""
    recipe = recipe_module.TrainEagle3Recipe.__new__(recipe_module.TrainEagle3Recipe)
    recipe.target_wrapper = backend
    recipe.dist_env = SimpleNamespace(is_main=True)
    recipe.target_prefetch_depth = recipe._resolve_prefetch_depth({"target_prefetch_depth": depth})
    return recipe


@pytest.mark.parametrize(("depth", "num_servers"), [(1, 1), (2, 2), (2, 1)])
def test_recipe_prefetch_iterator_pairs_every_batch_with_its_supervision_in_order(
    servers: list[ServerProcess], colocated: object, depth: int, num_servers: int
) -> None:
    ids, mask = vocab_mapping(VOCAB, 250, seed=depth)
    # Batches of different lengths, so a batch paired with another's supervision cannot pass.
    loader = []
    for i in range(5):
        input_ids, attention_mask, loss_mask = random_batch(VOCAB, 2, 9 + 3 * i, seed=40 + i, pad=True)
        loader.append({"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask})
    urls = [s.url for s in servers[:num_servers]]
    with RemoteEagle3TargetModel.from_urls(urls, device="cpu") as remote:
        remote.set_vocab_mapping(ids, mask)
        recipe = _bare_recipe(remote, depth)
        # The recipe keeps at most one request in flight per server.
        assert recipe.target_prefetch_depth == min(depth, num_servers)
        pairs = list(recipe._prefetched_batches(loader))
    assert len(pairs) == len(loader)
    assert all(batch is sent for (batch, _), sent in zip(pairs, loader, strict=True))  # every batch, once, in order
    for batch, target_batch in pairs:
        assert type(target_batch) is upstream_target.Eagle3TargetBatch
        inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        assert_bit_exact(target_batch, colocated_supervision(colocated, inputs, ids, mask))


def test_through_our_hook_the_recipe_prefetches_servers_times_requests_in_flight(
    servers: list[ServerProcess], colocated: object
) -> None:
    ids, mask = vocab_mapping(VOCAB, 220, seed=11)
    loader = []
    for i in range(9):
        input_ids, attention_mask, loss_mask = random_batch(VOCAB, 2, 7 + 2 * i, seed=70 + i, pad=True)
        loader.append({"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask})
    backend = configured_backend({"max_in_flight_per_server": 2})
    with backend.from_urls([s.url for s in servers], device="cpu") as remote:
        remote.set_vocab_mapping(ids, mask)
        recipe = _bare_recipe(remote, depth=8)
        assert recipe.target_prefetch_depth == len(servers) * 2  # the recipe's cap, lifted to every slot
        pairs = list(recipe._prefetched_batches(loader))
        peaks = [entry["peak_in_flight"] for entry in remote.transport_stats()]
    assert max(peaks) == 2  # a second request really was in flight on a server
    assert all(batch is sent for (batch, _), sent in zip(pairs, loader, strict=True))
    for batch, target_batch in pairs:
        inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        assert_bit_exact(target_batch, colocated_supervision(colocated, inputs, ids, mask))


def test_install_makes_the_recipe_build_our_client(servers: list[ServerProcess]) -> None:
    upstream_cls = upstream_remote.RemoteEagle3TargetModel
    recipe = recipe_module.TrainEagle3Recipe.__new__(recipe_module.TrainEagle3Recipe)
    recipe.device = torch.device("cpu")
    recipe_args = {"remote_urls": [s.url for s in servers], "remote_timeout": 30, "remote_max_retries": 1}
    with install(options_from_config(recipe_args)) as installed:
        assert recipe_module.RemoteEagle3TargetModel is installed.backend
        recipe._setup_remote_target(recipe_args)  # the recipe's own code path for backend: remote
        wrapper = recipe.target_wrapper
        try:
            assert isinstance(wrapper, RemoteEagle3TargetModel)
            assert wrapper.urls == recipe_args["remote_urls"]
            assert [s.control.max_retries for s in wrapper._servers] == [1, 1]
            assert wrapper.model_info()["vocab_size"] == VOCAB
        finally:
            wrapper.close()
    # Leaving the block restores upstream's class everywhere.
    assert recipe_module.RemoteEagle3TargetModel is upstream_cls
    assert upstream_remote.RemoteEagle3TargetModel is upstream_cls


def test_options_come_from_the_yaml_before_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EAGLE3_ENCODING", "logits")
    monkeypatch.setenv("EAGLE3_AUTH_TOKEN", "env-token")
    recipe_args = {"remote_encoding": "topk:4", "remote_data_plane": "", "remote_lease_seconds": 90}
    options = options_from_config(recipe_args)
    assert options == {"encoding": "topk:4", "lease_seconds": 90}  # the environment is the client's own fallback
    with install(options) as installed:
        resolved = ClientOptions.resolve(**installed.options)
        assert (resolved.encoding, resolved.lease_seconds, resolved.auth_token()) == ("topk:4", 90.0, "env-token")
        assert "env-token" not in resolved.describe()
    with pytest.raises(ValueError, match="recipe_args.remote_lease_seconds: lease_seconds must be positive"):
        options_from_config({"remote_lease_seconds": 0})
    monkeypatch.setenv("EAGLE3_LEASE_SECONDS", "soon")
    with pytest.raises(ValueError, match="EAGLE3_LEASE_SECONDS must be a number"):
        install({})


def test_every_recipe_option_is_a_client_keyword() -> None:
    recipe_args = {recipe_key(f): "1" for f in option_fields() if recipe_key(f)}
    assert {"remote_data_plane", "remote_encoding", "remote_auth_token", "remote_lease_seconds"} <= set(recipe_args)
    recipe_args.update(remote_data_plane="wire", remote_encoding="logits")
    kwargs = options_from_config(recipe_args)
    assert kwargs["token"] == "1" and kwargs["data_plane"] == "wire"
    ClientOptions.resolve({}, **kwargs)  # every key maps to a keyword the client takes


def _run_python(code: str) -> str:
    out = subprocess.run([PYTHON, "-c", code], env=python_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_the_appliance_does_not_import_automodel() -> None:
    code = (
        "import sys\n"
        "import eagle3_appliance.serving.server, eagle3_client.protocol, eagle3_client.wire\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith(('nemo_automodel', 'eagle3_client.backend'))}))\n"
    )
    assert _run_python(code) == "[]"


def test_a_broken_automodel_install_falls_back_to_local_types() -> None:
    code = (
        "import sys\n"
        "class Broken:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'nemo_automodel.components.speculative.eagle.backend':\n"
        "            raise RuntimeError('simulated CUDA extension failure')\n"
        "sys.meta_path.insert(0, Broken())\n"
        "import eagle3_client\n"
        "from eagle3_client import RemoteEagle3TargetModel\n"
        "print(eagle3_client.USING_NEMO_AUTOMODEL, eagle3_client.Eagle3TargetBatch.__module__)\n"
    )
    assert _run_python(code) == "False eagle3_client.contract"


def test_remote_urls_given_as_a_string_still_reach_every_server(servers: list[ServerProcess]) -> None:
    """``remote_urls: http://a,http://b`` (a string): the recipe's ``list(urls)`` splits it into characters."""
    recipe = recipe_module.TrainEagle3Recipe.__new__(recipe_module.TrainEagle3Recipe)
    recipe.device = torch.device("cpu")
    with install({}):
        recipe._setup_remote_target({"remote_urls": ",".join(s.url for s in servers)})
    try:
        assert recipe.target_wrapper.urls == [s.url for s in servers]
    finally:
        recipe.target_wrapper.close()


def test_the_recipes_packing_gate_is_lifted_for_our_backend_only() -> None:
    """The recipe's own ``_setup_online_target``: packing with ``remote`` passes its gate only while our class is bound."""
    recipe = object.__new__(recipe_module.TrainEagle3Recipe)
    recipe.cfg = {}  # the parallelism sizes the method reads after its gate: defaults
    recipe_cfg = {"target_model_backend": "remote", "packed_sequence_size": 64}
    with pytest.raises(NotImplementedError, match="only supported with the colocated target backend"):
        recipe._setup_online_target(recipe_cfg, "unused", None)
    with install():
        # Past the gate: the next thing the recipe needs is a server list.
        with pytest.raises(ValueError, match="requires recipe_args.remote_urls"):
            recipe._setup_online_target(recipe_cfg, "unused", None)
        with pytest.raises(NotImplementedError, match="only supported with the colocated target backend"):
            recipe._setup_online_target({**recipe_cfg, "target_model_backend": "sglang"}, "unused", None)
    with pytest.raises(NotImplementedError, match="only supported with the colocated target backend"):
        recipe._setup_online_target(recipe_cfg, "unused", None)  # uninstalled: upstream's gate again
