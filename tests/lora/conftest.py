import pytest
import torch


@pytest.fixture(scope="session")
def demo_model(data_dir):
    """The demo model loaded in-process on the CPU, through the real loading code."""
    from t2i.models.demo import demo_spec
    from t2i.models.loader import load_model

    return load_model(demo_spec(data_dir), torch.device("cpu"))


@pytest.fixture(scope="session")
def demo_model64(data_dir):
    """The demo model with its UNet and text encoders in float64, for comparisons with a
    merged-weights oracle: float64 rounding is 2**29 times finer than float32's, so the
    tolerance sits many orders of magnitude below any difference a wrong LoRA makes."""
    import dataclasses

    from t2i.models.demo import demo_spec
    from t2i.models.loader import load_model

    model = load_model(demo_spec(data_dir), torch.device("cpu"))
    for module in (model.unet, *model.text_encoders):
        module.to(torch.float64)
    return dataclasses.replace(model, dtype=torch.float64)


@pytest.fixture(scope="session")
def index64(demo_model64):
    from t2i.lora import LayerIndex

    return LayerIndex.from_model(demo_model64)


@pytest.fixture(scope="session")
def index(demo_model):
    from t2i.lora import LayerIndex

    return LayerIndex.from_model(demo_model)


@pytest.fixture
def lora_dir(tmp_path):
    path = tmp_path / "loras"
    path.mkdir()
    return path
