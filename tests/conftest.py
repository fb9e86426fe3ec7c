"""Fixtures shared by the suite: the built archives, in-process workers, and one real TorchServe per session."""

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
def server(tmp_path_factory):
    """A real TorchServe serving every archive of model_store/ from config.properties (token auth ON), free ports."""
    require_archives()
    torchserve = TorchServe(tmp_path_factory.mktemp("torchserve"))
    try:
        yield torchserve.start()
    finally:
        torchserve.stop()


def pytest_collection_modifyitems(items):
    """Tests that use the session TorchServe are ``slow`` (modules with servers of their own mark themselves)."""
    for item in items:
        if "server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
