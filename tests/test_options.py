"""Options are declared once: the CLI, the environment, the settings objects and the docs follow."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from eagle3_appliance.cli import app
from eagle3_appliance.settings import Settings, env_name, load_token, option_fields, options_markdown
from eagle3_client import options as client_options
from eagle3_client.automodel import options_from_config
from eagle3_client.options import ClientOptions

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()
WIDE = {"COLUMNS": "400"}  # rich wraps --help and errors at the terminal width


# -- the server ---------------------------------------------------------------------------


def test_every_server_option_is_a_serve_flag_with_its_environment_variable() -> None:
    result = runner.invoke(app, ["serve", "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    for f in option_fields():
        assert f"--{f.name.replace('_', '-')}" in result.output, f.name
        assert env_name(f.name) in result.output, f.name


def test_the_server_options_page_is_generated_from_the_declarations() -> None:
    page = (REPO / "docs" / "reference" / "server-options.md").read_text()
    assert page == options_markdown(), (
        "regenerate: eagle3-appliance options --markdown > docs/reference/server-options.md"
    )
    assert runner.invoke(app, ["options", "--markdown"]).output == page


def test_settings_check_every_value_once_for_the_cli_and_for_library_users(tmp_path: Path) -> None:
    assert Settings(max_queue=0).max_queue == 0
    for bad, message in [
        ({"lease_seconds": 0.01}, "--lease-seconds must be at least 0.1"),
        (
            {"min_lease_seconds": 10, "max_lease_seconds": 5},
            "--min-lease-seconds \\(10\\) is above --max-lease-seconds",
        ),
        ({"data_planes": "nccl,infiniband"}, "nccl and/or gloo"),
        ({"data_plane_ports": "9-3"}, "--data-plane-ports"),
        ({"aux_layer_ids": (1, 1, 2)}, "3 distinct layer ids"),
        ({"max_seq_len": 0}, "--max-seq-len must be at least 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            Settings(**bad)
    result = runner.invoke(app, ["serve", "--lease-seconds", "0.01"], env=WIDE)
    assert result.exit_code == 2 and "--lease-seconds" in result.output and "0.1" in result.output
    result = runner.invoke(app, ["serve", "--aux-layer-ids", "1,2"], env=WIDE)
    assert result.exit_code == 2 and "3 distinct layer ids" in result.output


def test_the_token_comes_from_the_value_or_the_file(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("  abc123\n")
    assert load_token("xyz", None) == "xyz"
    assert load_token(None, tmp_path / "tok") == "abc123"
    assert Settings(auth_token_file=tmp_path / "tok").auth_token == "abc123"
    assert load_token(None, None) is None and load_token("  ", None) is None
    with pytest.raises(ValueError, match="not both"):
        load_token("xyz", tmp_path / "tok")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        load_token(None, tmp_path / "empty")
    with pytest.raises(ValueError, match="cannot read"):
        load_token(None, tmp_path / "missing")


# -- the client ---------------------------------------------------------------------------


def test_keywords_beat_the_environment_which_beats_the_defaults() -> None:
    env = {"EAGLE3_DATA_PLANE": "GLOO", "EAGLE3_DATA_PLANE_TIMEOUT": "7", "EAGLE3_CLIENT_POOL_MB": "3"}
    opts = ClientOptions.resolve(env)
    assert (opts.data_plane, opts.data_plane_timeout, opts.buffer_pool_bytes) == ("gloo", 7.0, 3 << 20)
    opts = ClientOptions.resolve(env, data_plane="wire", data_plane_timeout=3, timeout=None)
    assert (opts.data_plane, opts.data_plane_timeout, opts.timeout) == ("wire", 3.0, 120.0)
    assert ClientOptions.resolve({}) == ClientOptions()
    with pytest.raises(ValueError, match="data_plane must be one of"):
        ClientOptions.resolve({}, data_plane="infiniband")
    with pytest.raises(ValueError, match="EAGLE3_CLIENT_POOL_MB must be a number"):
        ClientOptions.resolve({"EAGLE3_CLIENT_POOL_MB": "lots"})
    with pytest.raises(ValueError, match="data_plane_timeout must be positive"):
        ClientOptions.resolve({}, data_plane_timeout=0)
    with pytest.raises(ValueError, match="EAGLE3_LEASE_SECONDS must be a number"):
        ClientOptions.resolve({"EAGLE3_LEASE_SECONDS": "soon"})
    with pytest.raises(TypeError, match="unknown client option"):
        ClientOptions.resolve({}, data_plan="wire")


def test_recipe_args_are_checked_one_by_one_then_together(monkeypatch: pytest.MonkeyPatch) -> None:
    # A value is checked on its own (naming its key); a pair only against each other, not the defaults.
    monkeypatch.delenv("EAGLE3_PROBE_INTERVAL", raising=False)
    monkeypatch.delenv("EAGLE3_PROBE_MAX_INTERVAL", raising=False)
    pair = {"remote_probe_interval": 20, "remote_probe_max_interval": 30}
    assert options_from_config(pair) == {"probe_interval": 20, "probe_max_interval": 30}
    with pytest.raises(ValueError, match=r"probe_max_interval \(5\) must be at least probe_interval \(20\)"):
        options_from_config({"remote_probe_interval": 20, "remote_probe_max_interval": 5})
    with pytest.raises(ValueError, match="recipe_args.remote_probe_interval: probe_interval must be positive"):
        options_from_config({"remote_probe_interval": 0, "remote_probe_max_interval": 30})


def test_the_client_token_comes_from_the_keyword_the_environment_or_a_file(tmp_path: Path) -> None:
    assert ClientOptions.resolve({}).auth_token() is None
    (tmp_path / "t").write_text("from-file\n")
    assert ClientOptions.resolve({"EAGLE3_AUTH_TOKEN_FILE": str(tmp_path / "t")}).auth_token() == "from-file"
    both = {"EAGLE3_AUTH_TOKEN_FILE": str(tmp_path / "t"), "EAGLE3_AUTH_TOKEN": "from-env"}
    assert ClientOptions.resolve(both).auth_token() == "from-env"
    assert ClientOptions.resolve(both, token="arg").auth_token() == "arg"
    assert "arg" not in repr(ClientOptions.resolve({}, token="arg"))
    assert "token=***" in ClientOptions.resolve({}, token="arg").describe()


def test_the_client_options_page_is_generated_from_the_declarations() -> None:
    page = (REPO / "docs" / "reference" / "client-options.md").read_text()
    assert page == client_options.options_markdown(), (
        "regenerate: python -m eagle3_client.options > docs/reference/client-options.md"
    )
