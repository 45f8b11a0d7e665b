import pytest
import torch


@pytest.fixture(scope="session")
def demo_model(data_dir):
    """The demo model loaded in-process on the CPU, through the real loading code."""
    from t2i.models.demo import demo_spec
    from t2i.models.loader import load_model

    return load_model(demo_spec(data_dir), torch.device("cpu"))


@pytest.fixture(scope="session")
def index(demo_model):
    from t2i.lora import LayerIndex

    return LayerIndex.from_model(demo_model)


@pytest.fixture
def lora_dir(tmp_path):
    path = tmp_path / "loras"
    path.mkdir()
    return path
