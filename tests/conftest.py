"""Fixtures shared by the suite: the built archives, in-process workers, and one real TorchServe per session."""

import dataclasses

import pytest

import registry
from scripts.server import ROOT, TorchServe
from tests.worker import Worker

STORE = ROOT / "model_store"


def require_archives():
    missing = [f"{v.archive}.mar" for _, v in registry.served() if not (STORE / f"{v.archive}.mar").exists()]
    if missing:
        pytest.fail(f"model_store/ lacks {', '.join(missing)}: run `make archive` (or `make test`)", pytrace=False)


@pytest.fixture(scope="session")
def worker(tmp_path_factory):
    """worker("mnist") -> that archive's handler loaded in-process (cached per archive)."""
    require_archives()
    loaded = {}

    def load(stem, batch_size=8):
        if (stem, batch_size) not in loaded:
            loaded[stem, batch_size] = Worker(STORE / f"{stem}.mar", tmp_path_factory.mktemp(stem), batch_size)
        return loaded[stem, batch_size]

    return load


@pytest.fixture(scope="session")
def tiny_regression(tmp_path_factory):
    """The regression handler loaded in-process from an archive trained here in seconds (3 epochs) and built by
    archive.sh's code: handler contracts with nothing from `make archive` (the fast tier)."""
    from scripts import archive
    from train import regression

    folder = tmp_path_factory.mktemp("tiny_regression")
    entry, version = registry.archive("regression")
    regression.main(["--epochs", "3", "--out", str(folder / "artifacts")])
    built = archive.build(entry, dataclasses.replace(version, artifacts=str(folder / "artifacts")), store=folder)
    return Worker(built, folder / "unpacked")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real TorchServe serving every archive of model_store/ from config.properties (token auth ON), free ports."""
    require_archives()
    torchserve = TorchServe(tmp_path_factory.mktemp("torchserve"))
    try:
        yield torchserve.start()
    finally:
        torchserve.stop()


LONGEST_FIRST = ("tests/scripts/test_new_model.py", "tests/scripts/test_build.py", "tests/scripts/test_setup.py")
"""Test files of minutes (they copy the repository, train and serve), run first: under `make test`'s two processes
(pytest-xdist, a file at a time) the other files then fill the second process meanwhile, instead of one process
running the longest file alone at the end."""


def pytest_collection_modifyitems(items):
    """Tests that use the built archives are ``trained``, and those that use the session TorchServe are ``slow`` too
    (modules that read artifacts or start servers of their own mark themselves); ``LONGEST_FIRST`` files first."""
    rank = {path: position for position, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "server" in fixtures:
            item.add_marker(pytest.mark.slow)
        if {"server", "worker"} & set(fixtures):
            item.add_marker(pytest.mark.trained)
