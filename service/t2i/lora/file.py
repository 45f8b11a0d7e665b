"""Reading and checking one LoRA file, and loading its factors onto a device.

`inspect_file` is what registration runs: it reads the header, places every key on a layer of
the model (keys.py), checks each layer's shapes against the module it patches, checks every
placed tensor for NaN and infinity, and hashes the file. A file is refused (LoraFileError, the
message naming the key, its shape and what the layer needs) when it holds an adapter type other
than LoRA/LoCon, when a placed layer's shapes do not fit, when a value is not finite, or when
it places no key at all; keys that cannot be placed are reported, as ComfyUI logs and skips them.

Hashes. A1111 shows a LoRA's hash in the infotext as `Lora hashes: "name: <12 hex>"`: its
`NetworkOnDisk` takes `sshs_model_hash` from the metadata or else computes, for .safetensors,
`hashes.sha256(..., use_addnet_hash=True)`, i.e. kohya's `addnet_hash_safetensors`: the SHA-256
of the bytes after the header (8-byte length + JSON), so that editing metadata does not change
it; `shorthash` is its first 12 hex digits. sd-scripts writes `sshs_model_hash` as that same
hash of the tensor data, so computing it gives the same value without trusting the metadata.
`sha256` here is that hash; `file_sha256` is the SHA-256 of the whole file (what Civitai calls
AutoV2, first 10 hex digits), for looking a file up.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .keys import TEXT_ENCODERS, LayerIndex, Placement, split_key, unsupported_kind
from .metadata import base_model_family, trigger_words
from .weights import LayerLora, LoraWeights

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
SHORT_HASH = 12  # hex digits A1111 shows
_HEADER_LIMIT = 100 * 1024 * 1024  # what the safetensors format itself allows
_FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_REPORTED = 5  # unplaced keys named in a refusal message


class LoraFileError(ValueError):
    """A file that cannot be used as a LoRA for this model; the message says why."""


@dataclass(frozen=True)
class FileStamp:
    """What tells a file changed without reading it."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        st = os.stat(path)
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True)
class PlannedLayer:
    """One layer of the file and the module it patches."""

    placement: Placement
    layer_name: str  # as spelled in the file
    down: str
    up: str
    mid: str | None
    alpha: str | None
    rank: int
    parameters: int  # elements of down + up (+ mid)


@dataclass(frozen=True)
class LoraInfo:
    """A registered LoRA: what the model list shows and what loading needs."""

    name: str
    path: Path
    size_bytes: int
    sha256: str  # A1111/kohya "addnet" hash: SHA-256 of the tensor data after the header
    file_sha256: str  # SHA-256 of the whole file
    base_model: str  # family from the metadata ("sdxl", ...) or "unknown"
    rank: int  # the largest rank of any layer
    layer_counts: dict[str, int]  # component -> placed layers
    trigger_words: tuple[str, ...]
    unplaced: tuple[tuple[str, str], ...]  # (key, why) for keys that patch nothing
    plan: tuple[PlannedLayer, ...]
    stamp: FileStamp
    title: str | None = None  # ss_output_name, the name the trainer gave it

    @property
    def short_hash(self) -> str:
        return self.sha256[:SHORT_HASH]

    @property
    def has_text_encoder(self) -> bool:
        return any(self.layer_counts.get(component, 0) for component in TEXT_ENCODERS)

    @property
    def has_unet(self) -> bool:
        return bool(self.layer_counts.get("unet", 0))

    def resident_bytes(self, dtype: torch.dtype) -> int:
        """Device bytes of the factors once loaded in `dtype`."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return sum(layer.parameters for layer in self.plan) * itemsize


def inspect_file(path: Path, name: str, index: LayerIndex) -> LoraInfo:
    """Check `path` against the model behind `index`; raises LoraFileError with the reason."""
    path = Path(path)
    stamp = FileStamp.of(path)
    sha256, file_sha256 = _hashes(path, name)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in keys}
            dtypes = {key: handle.get_slice(key).get_dtype() for key in keys}
            plan, unplaced = plan_layers(name, shapes, dtypes, index, metadata)
            for layer in plan:
                for key in (layer.down, layer.up, layer.mid, layer.alpha):
                    if key is not None:
                        _check_finite(name, key, handle.get_tensor(key))
    except SafetensorError as error:
        raise LoraFileError(
            f"LoRA {name!r}: {path.name} is not a readable safetensors file ({error})"
        ) from None
    if FileStamp.of(path) != stamp:
        raise LoraFileError(
            f"LoRA {name!r}: {path.name} changed while it was being read; rescan once it is complete"
        )
    counts: dict[str, int] = {}
    for layer in plan:
        counts[layer.placement.component] = counts.get(layer.placement.component, 0) + 1
    return LoraInfo(
        name=name,
        path=path,
        size_bytes=stamp.size,
        sha256=sha256,
        file_sha256=file_sha256,
        base_model=base_model_family(metadata),
        rank=max(layer.rank for layer in plan),
        layer_counts=counts,
        trigger_words=trigger_words(metadata),
        unplaced=tuple(unplaced),
        plan=tuple(plan),
        stamp=stamp,
        title=metadata.get("ss_output_name") or None,
    )


def plan_layers(
    name: str,
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, str],
    index: LayerIndex,
    metadata: dict[str, str] | None = None,
) -> tuple[list[PlannedLayer], list[tuple[str, str]]]:
    """Group the keys into layers and place them; refuse what cannot be applied faithfully."""
    unsupported = sorted({kind for key in shapes if (kind := unsupported_kind(key))})
    if unsupported:
        raise LoraFileError(
            f"LoRA {name!r} is {' and '.join(unsupported)}, which this service does not apply; "
            "only plain LoRA and LoCon (lora_up/lora_down[/lora_mid], lora_A/lora_B) are supported"
        )
    groups: dict[str, dict[str, str]] = {}
    unplaced: list[tuple[str, str]] = []
    for key in shapes:
        split = split_key(key)
        if split is None:
            unplaced.append((key, "not a LoRA factor (up, down, mid or alpha)"))
            continue
        layer_name, part = split
        if part in groups.setdefault(layer_name, {}):
            unplaced.append((key, f"a second {part} factor for layer {layer_name!r}"))
            continue
        groups[layer_name][part] = key

    plan: list[PlannedLayer] = []
    owners: dict[Placement, str] = {}
    for layer_name, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            missing = "down" if "down" not in parts else "up"
            unplaced.extend((key, f"layer {layer_name!r} has no {missing} factor") for key in parts.values())
            continue
        placement = index.place(layer_name)
        if isinstance(placement, str):
            unplaced.extend((key, placement) for key in parts.values())
            continue
        if placement in owners:
            raise LoraFileError(
                f"LoRA {name!r}: layers {owners[placement]!r} and {layer_name!r} both patch "
                f"{placement.component} {placement.path}; a file must name each layer once"
            )
        owners[placement] = layer_name
        for key in parts.values():
            if dtypes[key] not in _FLOAT_DTYPES:
                raise LoraFileError(
                    f"LoRA {name!r}: key {key!r} has dtype {dtypes[key]}; factors must be F16, BF16, F32 or F64"
                )
        rank = check_shapes(
            name,
            index.module(placement),
            placement,
            {part: (key, shapes[key]) for part, key in parts.items()},
        )
        parameters = sum(_numel(shapes[parts[p]]) for p in ("down", "up", "mid") if p in parts)
        plan.append(
            PlannedLayer(
                placement,
                layer_name,
                parts["down"],
                parts["up"],
                parts.get("mid"),
                parts.get("alpha"),
                rank,
                parameters,
            )
        )
    if not plan:
        family = base_model_family(metadata or {})
        hint = f" (its metadata says base model {family!r})" if family != "unknown" else ""
        named = ", ".join(f"{key!r}: {why}" for key, why in unplaced[:_REPORTED])
        more = f" and {len(unplaced) - _REPORTED} more" if len(unplaced) > _REPORTED else ""
        raise LoraFileError(
            f"LoRA {name!r} places no key on this model{hint}; "
            + (f"unplaced keys: {named}{more}" if unplaced else "the file holds no tensors")
        )
    return plan, unplaced


def check_shapes(
    name: str, module: nn.Module, placement: Placement, parts: dict[str, tuple[str, tuple[int, ...]]]
) -> int:
    """The layer's rank, after checking up, down, mid and alpha fit `module`."""
    down_key, down = parts["down"]
    up_key, up = parts["up"]
    where = f"{placement.component} {placement.path}"

    def refuse(key: str, shape: tuple[int, ...], wanted: str) -> LoraFileError:
        return LoraFileError(f"LoRA {name!r}: key {key!r} has shape {list(shape)} but {where} needs {wanted}")

    if not down or down[0] < 1:
        raise refuse(down_key, down, "a rank r >= 1 as the first dimension")
    r = down[0]
    if isinstance(module, nn.Linear):
        out, inp = module.out_features, module.in_features
        what = f"(Linear {inp} -> {out})"
        if down not in ((r, inp), (r, inp, 1, 1)):
            raise refuse(down_key, down, f"[r, {inp}] {what}")
        if up not in ((out, r), (out, r, 1, 1)):
            raise refuse(up_key, up, f"[{out}, {r}] with r = {r} from the down factor {what}")
        if "mid" in parts:
            raise refuse(parts["mid"][0], parts["mid"][1], f"no lora_mid: it is a Linear layer {what}")
    else:
        out, inp = module.out_channels, module.in_channels
        kh, kw = module.kernel_size
        what = f"(Conv2d {inp} -> {out}, kernel {kh}x{kw})"
        if up not in ((out, r, 1, 1), (out, r)):
            raise refuse(up_key, up, f"[{out}, {r}, 1, 1] with r = {r} from the down factor {what}")
        if "mid" in parts:
            mid_key, mid = parts["mid"]
            if down not in ((r, inp, 1, 1), (r, inp)):
                raise refuse(down_key, down, f"[r, {inp}, 1, 1] beside a lora_mid {what}")
            if mid != (r, r, kh, kw):
                raise refuse(mid_key, mid, f"[{r}, {r}, {kh}, {kw}] {what}")
        else:
            allowed = [(r, inp, kh, kw)] + ([(r, inp)] if (kh, kw) == (1, 1) else [])
            if down not in allowed:
                raise refuse(down_key, down, f"[r, {inp}, {kh}, {kw}] {what}")
    if "alpha" in parts:
        alpha_key, alpha = parts["alpha"]
        if _numel(alpha) != 1:
            raise refuse(alpha_key, alpha, "a single alpha value")
    return r


def load_weights(info: LoraInfo, index: LayerIndex, device: torch.device, dtype: torch.dtype) -> LoraWeights:
    """Read the registered layers of `info` and build them on `device` in `dtype`.

    Refuses a file that changed since it was registered (its hash would no longer be its
    content's), so the caller rescans instead of serving different weights under an old name."""
    if FileStamp.of(info.path) != info.stamp:
        raise LoraFileError(
            f"LoRA {info.name!r}: {info.path.name} changed since it was registered; rescan the LoRA directory"
        )
    weights = LoraWeights(name=info.name, sha256=info.sha256, device=device, dtype=dtype)
    with safe_open(str(info.path), framework="pt", device="cpu") as handle:
        for layer in info.plan:
            module = index.module(layer.placement)
            built = build_layer(
                module,
                handle.get_tensor(layer.down),
                handle.get_tensor(layer.up),
                handle.get_tensor(layer.mid) if layer.mid else None,
                handle.get_tensor(layer.alpha) if layer.alpha else None,
                device,
                dtype,
            )
            weights.layers.setdefault(layer.placement.component, {})[layer.placement.path] = built
            weights.roots[layer.placement.component] = index.tables[layer.placement.component].root
    if device.type == "cuda":
        # Loads run on a worker thread: make the copies complete before anyone uses them.
        torch.cuda.current_stream(device).synchronize()
    return weights


def build_layer(
    module: nn.Module,
    down: torch.Tensor,
    up: torch.Tensor,
    mid: torch.Tensor | None,
    alpha: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
) -> LayerLora:
    """Shape the factors for unmerged application; alpha / r goes into up (in float32)."""
    r = down.shape[0]
    # Without an alpha entry the factor alpha / r is 1 (docs/lora.md).
    scale = float(alpha.float().reshape(-1)[0]) / r if alpha is not None else 1.0
    up = up.float() * scale
    if isinstance(module, nn.Linear):
        down, up = down.reshape(r, -1), up.reshape(up.shape[0], r)
        geometry: dict = {}
    else:
        if mid is not None or down.ndim == 2:
            down = down.reshape(r, -1, 1, 1)
        up = up.reshape(up.shape[0], r, 1, 1)
        geometry = {
            "stride": tuple(module.stride),
            "padding": module.padding,
            "dilation": tuple(module.dilation),
        }
        if not isinstance(geometry["padding"], str):
            geometry["padding"] = tuple(geometry["padding"])

    def place(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    return LayerLora(
        down=place(down), up=place(up), mid=place(mid) if mid is not None else None, module=module, **geometry
    )


def _check_finite(name: str, key: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise LoraFileError(
            f"LoRA {name!r}: key {key!r} holds {bad} NaN or infinite values; factors must be finite"
        )


def _hashes(path: Path, name: str) -> tuple[str, str]:
    """(SHA-256 of the data after the header, SHA-256 of the whole file), in one read."""
    data_hash, file_hash = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise LoraFileError(
                f"LoRA {name!r}: {path.name} is not a safetensors file (only {len(prefix)} bytes long)"
            )
        header_size = int.from_bytes(prefix, "little")
        if header_size > _HEADER_LIMIT:
            raise LoraFileError(
                f"LoRA {name!r}: {path.name} is not a safetensors file "
                f"(header length {header_size} is over the format's limit)"
            )
        header = handle.read(header_size)
        file_hash.update(prefix)
        file_hash.update(header)
        while chunk := handle.read(1 << 20):
            data_hash.update(chunk)
            file_hash.update(chunk)
    return data_hash.hexdigest(), file_hash.hexdigest()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
