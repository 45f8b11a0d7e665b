"""What a checkpoint's UNet predicts, and on which sigma table: read from the checkpoint as
ComfyUI reads it, then overridden by the models file's `prediction_type` / `zero_terminal_snr`.

- A single file (SGM layout, .safetensors): a tensor named `v_pred` makes it a v-prediction
  model, and `ztsnr` beside it gives it the zero-terminal-SNR table (NoobAI-XL v-pred ships
  both, as empty tensors). `ztsnr` alone means nothing: ComfyUI looks for it only with `v_pred`.
  The config folder's scheduler is not asked about the prediction: the file decides, as in
  ComfyUI.
- A diffusers folder: its scheduler config's `prediction_type` and `rescale_betas_zero_snr`.

Served: epsilon and v_prediction on the discrete (DDPM) sigma table, with or without zero
terminal SNR, except epsilon with zero terminal SNR (its last step is pure noise, which an
epsilon model cannot denoise). Checkpoints of other kinds are refused at load, naming what was
found there: EDM ones (`edm_mean`/`edm_std` keys, as Playground v2.5; `edm_vpred.*` keys, as
CosXL; an EDM scheduler), flow-matching ones (a FlowMatch scheduler, flow sigmas, a
`flow_prediction`), and any other prediction_type (`sample`, say). The models file may set the
prediction of a discrete checkpoint, never turn an EDM or flow one into a discrete one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..sampling import EPSILON, PREDICTION_TYPES, V_PREDICTION
from .config import ModelSpec

V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"
EDM_KEYS = ("edm_mean", "edm_std")
EDM_VPRED_PREFIX = "edm_vpred."
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


class UnsupportedModel(ValueError):
    """A checkpoint of a kind this service does not serve; the message says what was found."""


@dataclass(frozen=True)
class ModelKind:
    prediction_type: str = EPSILON
    zero_terminal_snr: bool = False
    # Where each came from, for the log line and for refusals: "checkpoint keys", "scheduler
    # config", "models file" or "default".
    source: str = "default"


def read_single_file(spec: ModelSpec) -> ModelKind:
    """The kind the tensor names of a single-file checkpoint say (its tensors are not read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(spec.path), "pt") as checkpoint:
            keys = set(checkpoint.keys())
    except Exception as error:  # not a safetensors file: the loader cannot read it either
        raise UnsupportedModel(
            f"model {spec.id}: cannot read the tensor names of {spec.path} ({type(error).__name__}: {error}); "
            "single-file checkpoints must be .safetensors"
        ) from None
    if all(key in keys for key in EDM_KEYS):
        raise UnsupportedModel(
            f"model {spec.id}: {spec.path} has the keys {' and '.join(EDM_KEYS)}: an EDM model (as Playground v2.5); "
            f"served are {_served()}"
        )
    edm_vpred = sorted(key for key in keys if key.startswith(EDM_VPRED_PREFIX))
    if edm_vpred:
        raise UnsupportedModel(
            f"model {spec.id}: {spec.path} has the keys {', '.join(edm_vpred)}: a v-prediction EDM model (as CosXL); "
            f"served are {_served()}"
        )
    if V_PRED_KEY in keys:
        return ModelKind(V_PREDICTION, ZTSNR_KEY in keys, "checkpoint keys")
    return ModelKind(EPSILON, False, "checkpoint keys")


def read_scheduler_config(spec: ModelSpec, config: dict) -> ModelKind:
    """The kind a diffusers scheduler config says; `prediction_type` as found (checked later,
    after the models file had its say)."""
    where = f"model {spec.id}: the scheduler config of {spec.path}"
    name = str(config.get("_class_name", ""))
    prediction = config.get("prediction_type", EPSILON)
    flow = [found for found, present in (
        (name, "FlowMatch" in name), ("use_flow_sigmas: true", bool(config.get("use_flow_sigmas"))),
        ("prediction_type flow_prediction", prediction == "flow_prediction"),
    ) if present]
    if flow:
        raise UnsupportedModel(f"{where} is a flow-matching one ({', '.join(flow)}); served are {_served()}")
    if name.startswith("EDM"):
        raise UnsupportedModel(f"{where} is an EDM one ({name}); served are {_served()}")
    return ModelKind(prediction, bool(config.get("rescale_betas_zero_snr", False)), "scheduler config")


def resolve(spec: ModelSpec, found: ModelKind) -> ModelKind:
    """The kind the model is served as: the models file's keys where set, else what was found.

    Without `zero_terminal_snr` in the models file the found value holds, except when the models
    file makes the model an epsilon one: zero terminal SNR was found for the other kind then."""
    prediction = spec.prediction_type or found.prediction_type
    if prediction not in PREDICTION_TYPES:
        raise UnsupportedModel(
            f"model {spec.id}: prediction_type {prediction!r} (from the {found.source}) is not served; "
            f"served are {_served()} (the models file's prediction_type can say which it is)"
        )
    if spec.zero_terminal_snr is not None:
        zero_terminal_snr, snr_source = spec.zero_terminal_snr, "models file"
    else:
        zero_terminal_snr = found.zero_terminal_snr and not (spec.prediction_type == EPSILON)
        snr_source = found.source
    if zero_terminal_snr and prediction == EPSILON:
        raise UnsupportedModel(
            f"model {spec.id}: zero terminal SNR (from the {snr_source}) with prediction_type epsilon is not served: "
            "an epsilon model cannot denoise pure noise; set prediction_type: v_prediction or zero_terminal_snr: false "
            "in the models file"
        )
    overridden = spec.prediction_type is not None or spec.zero_terminal_snr is not None
    return ModelKind(prediction, zero_terminal_snr, "models file" if overridden else found.source)


def detect(spec: ModelSpec) -> ModelKind:
    """The kind `spec`'s checkpoint is served as; UnsupportedModel naming what was found."""
    found = read_single_file(spec) if spec.single_file else read_scheduler_config(spec, scheduler_config(spec.path))
    return resolve(spec, found)


def scheduler_config(folder: Path) -> dict:
    """A diffusers-layout folder's scheduler config ({} without one: diffusers' loader then says
    what is missing from the folder)."""
    try:
        return json.loads((Path(folder) / SCHEDULER_CONFIG).read_text())
    except FileNotFoundError:
        return {}


def _served() -> str:
    return "epsilon and v_prediction models on a discrete (DDPM) schedule, v_prediction also with zero terminal SNR"
