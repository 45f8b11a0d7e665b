"""The models file: modelId -> name, checkpoint path and request limits.

Example (YAML)::

    models:
      - id: 1
        name: Illustrious-XL v1.0
        path: /models/Illustrious-XL-v1.0.safetensors   # single file, or a diffusers folder
        config: /models/sdxl-config   # diffusers-layout folder with configs and tokenizers
        min_size: 256
        max_size: 2880
        price_multiplier: 1.0
        embeddings_dir: /models/embeddings   # optional: SDXL textual inversions (.safetensors)
        lora_dir: /models/loras              # optional: LoRAs requests may name (.safetensors)
        max_prompt_chunks: 8   # optional: longest prompt, in chunks of 75 CLIP tokens
        prediction_type: v_prediction   # optional: epsilon or v_prediction (default: read from the checkpoint)
        zero_terminal_snr: true         # optional (default: read from the checkpoint; v_prediction only)

A file that cannot be used is a ModelsFileError whose message is one line: the file, where in
it (`models[0].colour`), and what is allowed there, so `t2i serve` and `t2i up` can say it and
exit with status 2 before anything starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..domain import ModelInfo


class ModelsFileError(ValueError):
    """A models file that cannot be used; the message is one line."""


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(ge=1, le=2**31 - 1)
    name: str = Field(min_length=1)
    path: Path
    # For single-file checkpoints: a diffusers-layout folder holding the component configs and
    # tokenizers (no weights needed). Without it a single-file load would try the model hub.
    config: Path | None = None
    min_size: int = Field(default=256, ge=8)
    max_size: int = Field(default=2880, ge=8)
    max_steps: int = Field(default=150, ge=1, le=1000)
    # Largest width x height a request may ask for (0: max_size squared): what one request may
    # cost this replica (a 2880x2880 image is 8 times the work of a 1024x1024 one).
    max_pixels: int = Field(default=0, ge=0)
    # Scales the price of every request on this model (see t2i.billing.pricing).
    price_multiplier: float = Field(default=1.0, gt=0)
    # SDXL textual inversion files (`embedding:NAME` in prompts); loaded once at start.
    embeddings_dir: Path | None = None
    # Longest prompt accepted, in CLIP chunks of 75 tokens: each chunk adds 77 context tokens to
    # every UNet evaluation of the request, so the cap bounds what one request can cost.
    max_prompt_chunks: int = Field(default=8, ge=1, le=64)
    # LoRA files (.safetensors) requests may name; scanned at start and on SIGHUP.
    lora_dir: Path | None = None
    max_loras_per_request: int = Field(default=5, ge=0, le=16)
    # Device memory LoRA weights may hold (least recently used ones are evicted beyond it).
    lora_cache_bytes: int = Field(default=2 * 1024**3, ge=0)
    # What the UNet predicts and whether its sigma table has zero terminal SNR. Unset: read
    # from the checkpoint as ComfyUI reads it (models/kind.py); set: that, whatever the file says.
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    zero_terminal_snr: bool | None = None
    demo: bool = False

    @model_validator(mode="after")
    def _sizes_are_consistent(self) -> ModelSpec:
        if self.min_size % 8 or self.max_size % 8 or self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} and max_size {self.max_size} must be multiples of 8 with min <= max")
        return self

    @model_validator(mode="after")
    def _zero_terminal_snr_needs_v_prediction(self) -> ModelSpec:
        # At zero terminal SNR the last timestep is pure noise, where an epsilon model's
        # x0 = x - sigma * eps multiplies every error by sigma (about 4.5e3): no usable image.
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError("zero_terminal_snr: true needs prediction_type v_prediction (or unset), got epsilon")
        return self

    @property
    def single_file(self) -> bool:
        return self.path.is_file()

    def info(self) -> ModelInfo:
        return ModelInfo(
            id=self.id, name=self.name, min_size=self.min_size, max_size=self.max_size, max_steps=self.max_steps,
            max_pixels=self.max_pixels or self.max_size**2, max_prompt_chunks=self.max_prompt_chunks, demo=self.demo,
        )


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _ids_are_unique(self) -> ModelsFile:
        ids = [m.id for m in self.models]
        if len(ids) != len(set(ids)):
            raise ValueError(f"model ids must be unique, got {ids}")
        return self


def load_models_file(path: Path) -> list[ModelSpec]:
    """Parse and check a models file; relative paths are relative to the file's folder.
    ModelsFileError (one line) for a file that cannot be used."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ModelsFileError(f"models file {path}: cannot be read ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise ModelsFileError(f"models file {path}: not valid YAML ({_one_line(error)})") from None
    if not isinstance(raw, dict):
        found = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise ModelsFileError(f"models file {path}: must be a mapping with a `models` list, found {found}")
    try:
        parsed = ModelsFile.model_validate(raw)
    except ValidationError as error:
        raise ModelsFileError(f"models file {path}: " + "; ".join(_problem(e) for e in error.errors())) from None
    base = path.parent
    specs = []
    for spec in parsed.models:
        update = {"path": base / spec.path}
        if spec.config is not None:
            update["config"] = base / spec.config
        for folder in ("embeddings_dir", "lora_dir"):
            if getattr(spec, folder) is not None:
                update[folder] = base / getattr(spec, folder)
        resolved = spec.model_copy(update=update)
        if not resolved.path.exists():
            raise ModelsFileError(f"models file {path}: model {spec.id} path {resolved.path} does not exist")
        # A named but missing folder is a typo to report, not "none of them".
        for folder in ("embeddings_dir", "lora_dir"):
            value = getattr(resolved, folder)
            if value is not None and not value.is_dir():
                raise ModelsFileError(f"models file {path}: model {spec.id} {folder} {value} is not a folder")
        specs.append(resolved)
    return specs


def _problem(error: dict) -> str:
    """One validation error as `where: what is wrong; what is allowed`."""
    *parents, last = error["loc"] or ("(top level)",)
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    if error["type"] == "extra_forbidden":
        allowed = ModelSpec.model_fields if parents else ModelsFile.model_fields
        return f"{where}: unknown key {last!r}; the keys allowed here are {', '.join(allowed)}"
    if error["type"] in ("bool_type", "bool_parsing"):
        return f"{where}: must be true or false, got {error['input']!r}"
    if error["type"] == "literal_error":
        return f"{where}: must be one of {error['ctx']['expected'].replace(' or ', ', ')}, got {error['input']!r}"
    if error["type"] == "missing":
        return f"{where}: missing; every model needs {', '.join(n for n, f in ModelSpec.model_fields.items() if f.is_required())}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error" or "input" not in error:
        return f"{where or '(top level)'}: {message}"
    return f"{where}: {message}, got {error['input']!r}"


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
