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
    "eagle3_client.transports.control",
    "eagle3_client.transports.dataplane",
    "eagle3_client.backend",
    "eagle3_client.capture",
    "eagle3_client.dflash",
    "eagle3_client.dspark",
    "eagle3_client.eagle",
    "eagle3_client.vlm",
    "eagle3_client.vispec",
    "eagle3_client.msd",
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


def test_the_stream_loaders_are_exported() -> None:
    """A loader per family upstream's ``FeatureDataLoader`` does not read (the consumer side needs AutoModel)."""
    pytest.importorskip("nemo_automodel.components.speculative.streaming")
    loader = importlib.import_module("eagle3_client.streaming.loader")
    names = {"DFlashFeatureLoader", "DSparkFeatureLoader", "VispecFeatureLoader", "MSDFeatureLoader"}
    assert set(loader.__all__) == names
    assert all(callable(getattr(loader, name)) for name in names)


def test_client_exports() -> None:
    assert "RemoteEagle3TargetModel" in eagle3_client.__all__
    assert eagle3_client.RemoteEagle3TargetModel.from_urls is not None
    for name in ("RemoteDSparkTargetModel", "RemoteEagleTargetModel"):  # every family's adapter
        assert name in eagle3_client.__all__ and getattr(eagle3_client, name).from_urls is not None


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


def test_the_wheel_installs_only_our_package_names(tmp_path) -> None:  # noqa: ANN001
    """A wheel built from the repository adds no generic top-level module (client, appliance, loadtest)."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    src = tmp_path / "src"  # a copy of what the build reads, so the build leaves nothing in the checkout
    for name in ("pyproject.toml", "README.md"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(repo / name, src / name)
    for package in ("appliance/eagle3_appliance", "client/eagle3_client", "loadtest/eagle3_loadtest"):
        shutil.copytree(repo / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("eagle3_appliance-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"eagle3_appliance", "eagle3_client", "eagle3_loadtest"}
    # Every module of the source tree, subpackages included, is in the wheel.
    sources = {
        f"{path.relative_to(src / folder).as_posix()}"
        for folder in ("appliance", "client", "loadtest")
        for path in (src / folder).rglob("*.py")
    }
    assert sorted(sources - set(names)) == []


def test_a_trainer_folder_with_its_own_client_module_imports_ours(tmp_path) -> None:  # noqa: ANN001
    """The documented import line works next to a trainer's own ``client.py`` and ``appliance/``."""
    import subprocess
    import sys

    (tmp_path / "client.py").write_text("raise ImportError('the trainer client.py was imported')\n")
    (tmp_path / "appliance").mkdir()
    (tmp_path / "appliance" / "__init__.py").write_text("raise ImportError('the trainer appliance was imported')\n")
    (tmp_path / "train.py").write_text(
        "from eagle3_client import RemoteEagle3TargetModel\nprint(RemoteEagle3TargetModel.__module__)\n"
    )
    out = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "eagle3_client.backend"
