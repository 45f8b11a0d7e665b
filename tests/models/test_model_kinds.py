"""Which kind of model a checkpoint is (epsilon or v-prediction, zero terminal SNR or not),
read as ComfyUI reads it, the models file's override, and the refusal of the kinds that are not
served, each naming what was found. Then real loads of tiny v-prediction checkpoints."""

import pytest
import torch

from t2i.models.config import ModelSpec, ModelsFileError, load_models_file
from t2i.models.kind import ModelKind, UnsupportedModel, detect
from t2i.models.loader import load_model
from t2i.sampling import SigmaTable

from ..support.model_kinds import config_folder, diffusers_folder, marker_keys, names_only_file, single_file


def spec(path, **keys) -> ModelSpec:
    return ModelSpec(id=7, name="m", path=path, min_size=64, **keys)


def scheduler_folder(tmp_path, **config):
    """A folder with only a scheduler config: all the kind is read from."""
    import json

    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", **config})
    )
    return tmp_path


@pytest.mark.parametrize("keys, expected", [
    ((), ModelKind("epsilon", False, "checkpoint keys")),
    (("v_pred",), ModelKind("v_prediction", False, "checkpoint keys")),
    (("v_pred", "ztsnr"), ModelKind("v_prediction", True, "checkpoint keys")),
    (("ztsnr",), ModelKind("epsilon", False, "checkpoint keys")),  # ComfyUI reads ztsnr only beside v_pred
])
def test_a_single_file_is_read_by_its_marker_keys(tmp_path, keys, expected):
    assert detect(spec(names_only_file(tmp_path / "m.safetensors", *keys))) == expected


@pytest.mark.parametrize("config, expected", [
    ({}, ModelKind("epsilon", False, "scheduler config")),
    ({"prediction_type": "epsilon"}, ModelKind("epsilon", False, "scheduler config")),
    ({"prediction_type": "v_prediction"}, ModelKind("v_prediction", False, "scheduler config")),
    ({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}, ModelKind("v_prediction", True, "scheduler config")),
])
def test_a_diffusers_folder_is_read_by_its_scheduler_config(tmp_path, config, expected):
    assert detect(spec(scheduler_folder(tmp_path, **config))) == expected


@pytest.mark.parametrize("keys, found", [
    (("edm_mean", "edm_std"), "has the keys edm_mean and edm_std: an EDM model"),
    (("edm_vpred.sigma_max", "edm_vpred.sigma_min"), "has the keys edm_vpred.sigma_max, edm_vpred.sigma_min: a v-prediction EDM"),
    (("v_pred", "edm_vpred.sigma_max"), "has the keys edm_vpred.sigma_max: a v-prediction EDM"),
])
def test_single_files_of_other_kinds_are_refused_naming_what_was_found(tmp_path, keys, found):
    path = names_only_file(tmp_path / "m.safetensors", *keys)
    # Not even the models file turns them into a discrete model.
    for keys_set in ({}, {"prediction_type": "v_prediction"}):
        with pytest.raises(UnsupportedModel) as refused:
            detect(spec(path, **keys_set))
        message = str(refused.value)
        assert message.startswith(f"model 7: {path} ") and found in message, message
        assert "served are epsilon and v_prediction" in message


@pytest.mark.parametrize("config, found", [
    ({"prediction_type": "sample"}, "prediction_type 'sample' (from the scheduler config) is not served"),
    ({"prediction_type": "flow_prediction"}, "is a flow-matching one (prediction_type flow_prediction)"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "is a flow-matching one (FlowMatchEulerDiscreteScheduler)"),
    ({"use_flow_sigmas": True, "prediction_type": "v_prediction"}, "is a flow-matching one (use_flow_sigmas: true)"),
    ({"_class_name": "EDMDPMSolverMultistepScheduler", "prediction_type": "epsilon"},
     "is an EDM one (EDMDPMSolverMultistepScheduler)"),
    ({"prediction_type": "epsilon", "rescale_betas_zero_snr": True},
     "zero terminal SNR (from the scheduler config) with prediction_type epsilon is not served"),
])
def test_diffusers_folders_of_other_kinds_are_refused_naming_what_was_found(tmp_path, config, found):
    with pytest.raises(UnsupportedModel) as refused:
        detect(spec(scheduler_folder(tmp_path, **config)))
    message = str(refused.value)
    assert message.startswith("model 7: ") and found in message, message


def test_the_models_file_overrides_what_the_checkpoint_says(tmp_path):
    plain = names_only_file(tmp_path / "plain.safetensors")
    noob = names_only_file(tmp_path / "noob.safetensors", "v_pred", "ztsnr")
    assert detect(spec(plain, prediction_type="v_prediction")) == ModelKind("v_prediction", False, "models file")
    assert detect(spec(plain, prediction_type="v_prediction", zero_terminal_snr=True)) == ModelKind("v_prediction", True, "models file")
    assert detect(spec(noob, zero_terminal_snr=False)) == ModelKind("v_prediction", False, "models file")
    # Made an epsilon model, the zero terminal SNR found for the v-prediction one goes too.
    assert detect(spec(noob, prediction_type="epsilon")) == ModelKind("epsilon", False, "models file")
    # A diffusers config's unknown prediction_type is what the models file can correct.
    (tmp_path / "folder").mkdir()
    sample = scheduler_folder(tmp_path / "folder", prediction_type="sample")
    assert detect(spec(sample, prediction_type="v_prediction")) == ModelKind("v_prediction", False, "models file")
    with pytest.raises(UnsupportedModel) as refused:
        detect(spec(plain, zero_terminal_snr=True))
    assert "zero terminal SNR (from the models file) with prediction_type epsilon is not served" in str(refused.value)


def write_models(tmp_path, entry: str):
    (tmp_path / "m.safetensors").write_bytes(b"")
    path = tmp_path / "models.yaml"
    path.write_text(f"models:\n  - {{id: 1, name: m, path: m.safetensors, {entry}}}\n")
    return path


@pytest.mark.parametrize("entry, expected", [
    ("prediction_type: eps", "models[0].prediction_type: must be one of 'epsilon', 'v_prediction', got 'eps'"),
    ("prediction_type: v-prediction", "models[0].prediction_type: must be one of 'epsilon', 'v_prediction', got 'v-prediction'"),
    ("zero_terminal_snr: maybe", "models[0].zero_terminal_snr: must be true or false, got 'maybe'"),
    ("prediction_type: epsilon, zero_terminal_snr: true",
     "models[0]: zero_terminal_snr: true needs prediction_type v_prediction (or unset), got epsilon"),
])
def test_bad_kind_keys_in_the_models_file_are_one_line_naming_the_key_and_what_is_allowed(tmp_path, entry, expected):
    path = write_models(tmp_path, entry)
    with pytest.raises(ModelsFileError) as refused:
        load_models_file(path)
    message = str(refused.value)
    assert message == f"models file {path}: {expected}", message


def test_kind_keys_in_the_models_file_are_read(tmp_path):
    (loaded,) = load_models_file(write_models(tmp_path, "prediction_type: v_prediction, zero_terminal_snr: true"))
    assert (loaded.prediction_type, loaded.zero_terminal_snr) == ("v_prediction", True)
    (default,) = load_models_file(write_models(tmp_path, "min_size: 64"))
    assert (default.prediction_type, default.zero_terminal_snr) == (None, None)


# --- real loads ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_dir(data_dir):
    from t2i.models.demo import ensure_demo_model

    return ensure_demo_model(data_dir)


@pytest.fixture(scope="module")
def checkpoints(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    return {
        "config": config_folder(demo_dir, root / "config"),
        "noob": single_file(demo_dir, root / "noob-vpred.safetensors", marker_keys(v_pred=True, ztsnr=True)),
        "vpred": single_file(demo_dir, root / "illustrious-vpred.safetensors", marker_keys(v_pred=True)),
        "folder": diffusers_folder(demo_dir, root / "vpred-folder", prediction_type="v_prediction", rescale_betas_zero_snr=True),
    }


@pytest.mark.parametrize("name, expected", [
    ("noob", ModelKind("v_prediction", True, "checkpoint keys")),
    ("vpred", ModelKind("v_prediction", False, "checkpoint keys")),
    ("folder", ModelKind("v_prediction", True, "scheduler config")),
])
def test_v_prediction_checkpoints_load_with_their_kind_and_table(checkpoints, name, expected):
    path = checkpoints[name]
    model = load_model(spec(path, config=checkpoints["config"] if path.is_file() else None), torch.device("cpu"))
    assert model.kind == expected and model.prediction == "v_prediction"
    table = SigmaTable.sdxl(expected.zero_terminal_snr)
    assert torch.equal(model.sigma_table.sigmas, table.sigmas)
    assert model.sigma_table.zero_terminal_snr is expected.zero_terminal_snr
    info = model.info()
    assert (info.prediction_type, info.zero_terminal_snr) == ("v_prediction", expected.zero_terminal_snr)


def test_the_models_file_turns_a_v_prediction_file_into_an_epsilon_model(checkpoints):
    model = load_model(spec(checkpoints["noob"], config=checkpoints["config"], prediction_type="epsilon"), torch.device("cpu"))
    assert model.kind == ModelKind("epsilon", False, "models file")
    assert model.sigma_table.sigma_max == SigmaTable.sdxl().sigma_max
