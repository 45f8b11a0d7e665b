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
