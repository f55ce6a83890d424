"""Fixtures shared by every test: a session cache for builtin:// models, so no test writes to
~/.cache and subprocesses (the CLI, torchrun) find the same tiny model."""
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def kubetune_cache_dir(tmp_path_factory):
    """KUBETUNE_CACHE_DIR for this test session (inherited by subprocesses)."""
    cache = tmp_path_factory.mktemp("kubetune-cache")
    previous = os.environ.get("KUBETUNE_CACHE_DIR")
    os.environ["KUBETUNE_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("KUBETUNE_CACHE_DIR", None)
    else:
        os.environ["KUBETUNE_CACHE_DIR"] = previous
