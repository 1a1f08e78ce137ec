"""The server list that ``slurm/serve.sh`` maintains: jobs add and remove their servers, the client reads it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from eagle3_client.remote.fleet import ServerList, parse_server_list

COMMON = Path(__file__).resolve().parent.parent / "slurm" / "common.sh"


def bash(script: str) -> None:
    subprocess.run(["bash", "-c", f"set -euo pipefail; source {COMMON}; {script}"], check=True, timeout=60)


def test_jobs_add_and_remove_their_servers_and_the_client_follows(tmp_path: Path) -> None:
    path = tmp_path / "shared" / "fleet.txt"
    bash(f"server_list_update {path} add http://a:8001 http://a:8002")
    listed = ServerList(path)
    assert listed.urls == ["http://a:8001", "http://a:8002"]
    bash(f"server_list_update {path} add http://b:8001 http://a:8001")  # a second job; a repeat is listed once
    bash(f"server_list_update {path} remove http://a:8002")  # the first job drains one
    assert parse_server_list(path.read_text()) == ["http://a:8001", "http://b:8001"]
    assert listed.poll() is None and listed.poll() == ["http://a:8001", "http://b:8001"]
    bash(f"server_list_update {path} remove http://a:8001 http://b:8001")
    assert path.read_text() == ""  # every job gone: an empty list (the client drains everything)


def test_concurrent_jobs_never_lose_each_others_servers(tmp_path: Path) -> None:
    path = tmp_path / "fleet.txt"
    adds = " ".join(f"server_list_update {path} add http://n{i}:8001 &" for i in range(12))
    bash(f"{adds} wait")
    assert sorted(parse_server_list(path.read_text())) == sorted(f"http://n{i}:8001" for i in range(12))
    assert not list(tmp_path.glob("fleet.txt.tmp.*"))
