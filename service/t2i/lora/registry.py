"""The LoRAs a model offers: one directory of `.safetensors` files per model.

A LoRA's name is its file name without `.safetensors`. The directory is scanned when the
registry is made and again on `rescan()`; each file is checked against the model once
(file.inspect_file) and re-checked only when its size, mtime or inode change. Files that are
not `.safetensors`, sub-directories and hidden files are ignored; a symlink that leads out of
the directory is refused, so the directory is the whole of what a request can reach.

`resolve()` is the request-side check: names must be registered (an unknown name is
InvalidArgument listing close matches), strengths finite and within ComfyUI's LoraLoader range.
"""

from __future__ import annotations

import difflib
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import metrics
from ..errors import InvalidArgument
from .file import SUFFIX, FileStamp, LoraFileError, LoraInfo, inspect_file
from .keys import LayerIndex

log = logging.getLogger(__name__)

# ComfyUI's LoraLoader accepts strengths in [-100, 100]; the same bound keeps parity.
MAX_STRENGTH = 100.0
MAX_LORAS_PER_REQUEST = 8
MAX_NAME_LENGTH = 200
_CLOSE_MATCHES = 3


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA as a request names it (ComfyUI LoraLoader's two strengths)."""

    name: str
    strength_model: float = 1.0
    strength_clip: float = 1.0


@dataclass(frozen=True)
class ResolvedLora:
    """A request's LoRA after validation: the registered file and its strengths."""

    info: LoraInfo
    strength_model: float
    strength_clip: float


@dataclass
class RescanResult:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # re-checked because the file changed
    refused: dict[str, str] = field(default_factory=dict)  # file name -> why, for every refused file
    ignored: list[str] = field(default_factory=list)  # entries that are no LoRA file

    @property
    def differs(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def name_problem(name: object) -> str | None:
    """Why `name` cannot be a LoRA name, or None when it can."""
    if not isinstance(name, str) or not name:
        return "a LoRA name is a non-empty string"
    if len(name) > MAX_NAME_LENGTH:
        return f"a LoRA name has at most {MAX_NAME_LENGTH} characters"
    if "/" in name or "\\" in name or name in (".", ".."):
        return "a LoRA name is a file name without .safetensors, not a path"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "a LoRA name has no control characters"
    if ":" in name:
        return "a LoRA name has no ':' (it separates name and strength in <lora:name:weight>)"
    if name.startswith("."):
        return "a LoRA name does not start with '.' (hidden files are not LoRAs)"
    return None


class LoraRegistry:
    def __init__(
        self,
        directory: Path,
        index: LayerIndex,
        model_id: int | str = "",
        *,
        max_per_request: int = MAX_LORAS_PER_REQUEST,
        create: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.index = index
        self.model_id = model_id
        self.max_per_request = max_per_request
        if create:
            self.directory.mkdir(parents=True, exist_ok=True)
        if not self.directory.is_dir():
            raise ValueError(f"model {model_id}: lora_dir {self.directory} is not a directory")
        self._entries: dict[str, LoraInfo] = {}
        self._refused: dict[str, tuple[FileStamp, str]] = {}  # file name -> (stamp, why)
        self._ignored: set[str] = set()
        self._lock = threading.Lock()
        self.rescan()

    # ---------------------------------------------------------------- the directory

    def rescan(self) -> RescanResult:
        """Re-read the directory; returns what changed. Safe to call while requests resolve."""
        with self._lock:
            result = RescanResult()
            root = self.directory.resolve()
            try:
                entries = sorted(self.directory.iterdir())
            except OSError as error:
                log.error(
                    "cannot read the LoRA directory",
                    extra={"model_id": self.model_id, "path": str(self.directory), "error": str(error)},
                )
                entries = []
            found: dict[str, LoraInfo] = {}
            refused: dict[str, tuple[FileStamp, str]] = {}
            seen_ignored: set[str] = set()
            for path in entries:
                entry = path.name
                if not entry.endswith(SUFFIX) or entry.startswith(".") or path.is_dir():
                    seen_ignored.add(entry)
                    result.ignored.append(entry)
                    if entry not in self._ignored:
                        log.info(
                            "ignoring an entry of the LoRA directory that is not a .safetensors file",
                            extra={"model_id": self.model_id, "entry": entry},
                        )
                    continue
                name = entry[: -len(SUFFIX)]
                try:
                    stamp = self._admit(path, root, name)
                except LoraFileError as error:
                    refused[entry] = (FileStamp(-1, -1, -1), str(error))
                    continue
                previous = self._entries.get(name)
                if previous is not None and previous.stamp == stamp:
                    found[name] = previous
                    continue
                earlier = self._refused.get(entry)
                if earlier is not None and earlier[0] == stamp:
                    refused[entry] = earlier  # unchanged and still refused: no need to read it again
                    continue
                try:
                    info = inspect_file(path, name, self.index)
                except (LoraFileError, OSError) as error:
                    refused[entry] = (stamp, str(error))
                    continue
                found[name] = info
                (result.changed if previous is not None else result.added).append(name)
            for entry, (stamp, why) in refused.items():
                if self._refused.get(entry) != (stamp, why):
                    log.warning(
                        "refused a LoRA file",
                        extra={"model_id": self.model_id, "entry": entry, "reason": why},
                    )
                result.refused[entry] = why
            result.removed = sorted(set(self._entries) - set(found))
            for name, info in found.items():
                if name in result.added or name in result.changed:
                    log.info(
                        "registered a LoRA",
                        extra={
                            "model_id": self.model_id,
                            "lora": name,
                            "hash": info.short_hash,
                            "rank": info.rank,
                            "layers": info.layer_counts,
                            "unplaced_keys": len(info.unplaced),
                            "base_model": info.base_model,
                        },
                    )
                    for key, why in info.unplaced:
                        log.info(
                            "LoRA key not placed",
                            extra={"model_id": self.model_id, "lora": name, "key": key, "reason": why},
                        )
            for name in result.removed:
                log.info("a LoRA is gone from its directory", extra={"model_id": self.model_id, "lora": name})
            self._entries = found  # one assignment: readers see the old or the new set, never half
            self._refused = refused
            self._ignored = seen_ignored
            metrics.LORAS_REGISTERED.labels(str(self.model_id)).set(len(found))
            metrics.LORAS_REFUSED.labels(str(self.model_id)).set(len(refused))
            return result

    def _admit(self, path: Path, root: Path, name: str) -> FileStamp:
        """The stamp of a file that may be registered under `name`; LoraFileError otherwise."""
        problem = name_problem(name)
        if problem:
            raise LoraFileError(f"{path.name}: {problem}")
        resolved = path.resolve()
        if not resolved.is_relative_to(root):
            raise LoraFileError(f"{path.name}: a symlink to {resolved}, outside the LoRA directory {root}")
        if not resolved.is_file():
            raise LoraFileError(f"{path.name}: not a regular file")
        return FileStamp.of(resolved)

    # ---------------------------------------------------------------- lookups

    def names(self) -> list[str]:
        return sorted(self._entries)

    def loras(self) -> list[LoraInfo]:
        entries = self._entries
        return [entries[name] for name in sorted(entries)]

    @property
    def refused(self) -> dict[str, str]:
        return {entry: why for entry, (_, why) in self._refused.items()}

    def get(self, name: str, field_name: str = "lora") -> LoraInfo:
        """The registered LoRA `name`; InvalidArgument naming close matches otherwise."""
        problem = name_problem(name)
        if problem:
            raise InvalidArgument(field_name, name, problem)
        entries = self._entries
        if name in entries:
            return entries[name]
        raise InvalidArgument(field_name, name, self._unknown(name, entries))

    def _unknown(self, name: str, entries: dict[str, LoraInfo]) -> str:
        if name.endswith(SUFFIX) and name[: -len(SUFFIX)] in entries:
            return f"give the name without {SUFFIX}: {name[: -len(SUFFIX)]!r}"
        by_folded = {known.casefold(): known for known in entries}
        close = difflib.get_close_matches(name.casefold(), list(by_folded), n=_CLOSE_MATCHES, cutoff=0.6)
        where = f"model {self.model_id}" if self.model_id != "" else "this model"
        if close:
            return f"no LoRA of that name for {where}; close matches: " + ", ".join(
                repr(by_folded[c]) for c in close
            )
        return f"no LoRA of that name for {where} ({len(entries)} LoRAs are registered)"

    def resolve(self, requests: Sequence[LoraRequest], field_name: str = "loras") -> list[ResolvedLora]:
        """Validate a request's LoRA list before it is queued."""
        if len(requests) > self.max_per_request:
            raise InvalidArgument(
                field_name, f"{len(requests)} LoRAs", f"at most {self.max_per_request} LoRAs per request"
            )
        resolved: list[ResolvedLora] = []
        seen: set[str] = set()
        for i, request in enumerate(requests):
            info = self.get(request.name, f"{field_name}[{i}].name")
            if request.name in seen:
                raise InvalidArgument(
                    f"{field_name}[{i}].name",
                    request.name,
                    "each LoRA may be listed once (add the strengths instead)",
                )
            seen.add(request.name)
            for attribute in ("strength_model", "strength_clip"):
                value = getattr(request, attribute)
                if (
                    not isinstance(value, (int, float))
                    or not math.isfinite(value)
                    or abs(value) > MAX_STRENGTH
                ):
                    raise InvalidArgument(
                        f"{field_name}[{i}].{attribute}",
                        value,
                        f"must be a finite number from {-MAX_STRENGTH:g} to {MAX_STRENGTH:g}",
                    )
            resolved.append(ResolvedLora(info, float(request.strength_model), float(request.strength_clip)))
        return resolved
