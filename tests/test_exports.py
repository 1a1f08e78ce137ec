"""The public surface is what the package says it is."""

from __future__ import annotations

import importlib

import pytest

import eagle3_client

MODULES = [
    "eagle3_client",
    "eagle3_client.protocol",
    "eagle3_client.wire",
    "eagle3_client.errors",
    "eagle3_client.control",
    "eagle3_client.dataplane",
    "eagle3_client.backend",
    "eagle3_client.contract",
    "eagle3_client.automodel",
    "eagle3_client.automodel_launch",
]


@pytest.mark.parametrize("name", MODULES)
def test_every_name_in_all_exists(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__all__, name
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert missing == []


def test_client_exports() -> None:
    assert "RemoteEagle3TargetModel" in eagle3_client.__all__
    assert eagle3_client.RemoteEagle3TargetModel.from_urls is not None


def test_client_does_not_need_server_packages() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('sanic', 'pynvml', 'transformers', 'eagle3_appliance'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import eagle3_client\n"
        "from eagle3_client import RemoteEagle3TargetModel\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
