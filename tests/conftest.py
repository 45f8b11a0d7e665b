import os
from pathlib import Path

import pytest

# The suite never reaches for a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data directory with the demo model already built (built once per test session)."""
    from t2i.models.demo import ensure_demo_model

    path = tmp_path_factory.mktemp("data")
    ensure_demo_model(path)
    return path


@pytest.fixture
def postgres_url():
    """A fresh, empty PostgreSQL database for one test."""
    from testbed.backends import postgres_database

    url, drop = postgres_database()
    yield url
    drop()


@pytest.fixture
def redis_url():
    from testbed.backends import require_redis

    return require_redis()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """Each billing test runs against the embedded SQLite and against real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'billing.sqlite3'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def demo_model(data_dir):
    """The demo model loaded in-process on the CPU, through the real loading code."""
    import torch

    from t2i.models.demo import demo_spec
    from t2i.models.loader import load_model

    return load_model(demo_spec(data_dir), torch.device("cpu"))
