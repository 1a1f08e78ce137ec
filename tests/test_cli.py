"""The command line: help texts, environment variables, aux-layer choice, user errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from eagle3_appliance.cli import app
from eagle3_appliance.launch import ServerProcess
from eagle3_client import RemoteEagle3TargetModel, protocol, wire
from eagle3_client.synthetic import random_batch, vocab_mapping
from tests.oracle import Oracle, assert_bit_exact

runner = CliRunner()


def test_serve_help_explains_every_option_and_its_environment_variable() -> None:
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0
    for option, env in [
        ("--model", "EAGLE3_MODEL"),
        ("--dtype", "EAGLE3_DTYPE"),
        ("--device", "EAGLE3_DEVICE"),
        ("--aux-layer-ids", "EAGLE3_AUX_LAYER_IDS"),
        ("--trust-remote-code", "EAGLE3_TRUST_REMOTE_CODE"),
        ("--port", "EAGLE3_PORT"),
        ("--max-seq-len", "EAGLE3_MAX_SEQ_LEN"),
        ("--max-body-bytes", "EAGLE3_MAX_BODY_BYTES"),
    ]:
        assert option in result.output and env in result.output, option


@pytest.mark.parametrize(
    ("value", "message"),
    [("1,1,2", "3 distinct layer ids"), ("1,2", "3 distinct layer ids"), ("a,b,c", "comma-separated integers")],
)
def test_bad_aux_layer_ids_are_rejected_before_loading(value: str, message: str) -> None:
    result = runner.invoke(app, ["serve", "--aux-layer-ids", value], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert message in result.output


def test_out_of_range_aux_layer_ids_fail_with_a_clear_error(cache_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "eagle3_appliance", "serve", "--cache-dir", str(cache_dir), "--aux-layer-ids", "0,2,8"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 2
    assert "aux layer id 8 is out of range for a model with 8 layers" in proc.stderr


def test_a_missing_model_folder_is_a_clear_user_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "eagle3_appliance", "serve", "--model", str(tmp_path / "typo")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 2
    assert f"model folder {tmp_path / 'typo'} does not exist" in proc.stderr


def test_configuration_from_environment_and_custom_aux_layers(cache_dir: Path, oracle: Oracle, tmp_path: Path) -> None:
    env = {"EAGLE3_AUX_LAYER_IDS": "0,2,5", "EAGLE3_MAX_SEQ_LEN": "16", "EAGLE3_CACHE_DIR": str(cache_dir)}
    with ServerProcess(env=env, log_path=tmp_path / "server.log") as server:
        with RemoteEagle3TargetModel.from_urls([server.url], max_retries=0) as remote:
            assert remote.model_info()["aux_layer_ids"] == [0, 2, 5]
            ids, mask = vocab_mapping(oracle.vocab_size, 99, seed=3)
            remote.set_vocab_mapping(ids, mask)
            inputs = random_batch(oracle.vocab_size, 2, 16, seed=4)
            got = remote.generate_batch(*inputs)
            expected = oracle.supervision(*inputs, ids, mask)
            with torch.no_grad():
                hidden = oracle.model(input_ids=inputs[0], attention_mask=inputs[1], output_hidden_states=True)
            expected["aux_hidden_states"] = torch.cat([hidden.hidden_states[i + 1] for i in (0, 2, 5)], dim=-1)
            assert_bit_exact(got, expected)
        too_long = random_batch(oracle.vocab_size, 1, 17, seed=5)
        with httpx.Client(base_url=server.url, trust_env=False) as http:
            mapping = wire.encode({"selected_token_ids": ids, "selected_token_mask": mask})
            assert http.post("/set_vocab_mapping", content=mapping).status_code == 200
            answer = http.post(
                "/generate", content=wire.encode(dict(zip(protocol.GENERATE_INPUT_KEYS, too_long, strict=True)))
            )
        assert answer.status_code == 422
        assert answer.json()["error"] == "sequence length 17 exceeds this server's maximum of 16"


def test_demo_command_runs_the_main_job_bit_exact(cache_dir: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "eagle3_appliance",
            "demo",
            "--cache-dir",
            str(cache_dir),
            "--batches",
            "2",
            "--seq-len",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("bit-exact=yes") == 4  # embeddings, two batches, summary
    assert "exit code 0" in proc.stdout


def test_validate_says_when_its_reference_differs_from_the_servers_dtype(
    server: ServerProcess, cache_dir: Path
) -> None:
    """Exactness holds only on the server's own dtype and device: a mismatch is named, not left to a FAIL."""
    base = ["validate", "--url", server.url, "--cache-dir", str(cache_dir), "--batches", "1", "--seq-len", "16"]
    other = runner.invoke(app, [*base, "--dtype", "bfloat16", "--device", "cpu"], env={"COLUMNS": "200"})
    note = (
        "note    the server runs float32 on cpu, this reference bfloat16 on cpu: answers are bit-exact only "
        "against the server's own dtype and device; run validate with --dtype float32 --device cpu"
    )
    assert note in other.output.splitlines(), other.output
    same = runner.invoke(app, [*base, "--dtype", "float32", "--device", "cpu"], env={"COLUMNS": "200"})
    assert same.exit_code == 0, same.output
    assert "note " not in same.output and "result  PASS" in same.output


def test_produce_refuses_a_dspark_recipe_yaml_it_cannot_produce(tmp_path: Path) -> None:
    """A multimodal DSpark recipe reads its own VLM loader (vision inputs): ``produce -c`` says so
    before building any data."""
    pytest.importorskip("nemo_automodel")
    config = tmp_path / "dspark.yaml"
    config.write_text(
        "recipe: TrainDSparkRecipe\nrecipe_args:\n  target_model_name_or_path: /nonexistent\n  multimodal: true\n"
    )
    args = ["produce", "--urls", "http://127.0.0.1:9", "--queue", "appliance://127.0.0.1:9", "--run-id", "r"]
    result = runner.invoke(app, [*args, "-c", str(config), "--capture", "dspark:-1,3"], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "multimodal: true or cached_target_path has no stream backend" in " ".join(result.output.split())
