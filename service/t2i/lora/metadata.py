"""What a LoRA file's safetensors metadata says about it, for the model list.

Trainers write string-to-string metadata. kohya's sd-scripts writes `ss_*` keys
(`ss_base_model_version` such as "sdxl_base_v1-0", `ss_tag_frequency`: a JSON object of
dataset folder -> {caption tag: count}) and, from the SAI Model Spec, `modelspec.*` keys
(`modelspec.architecture` such as "stable-diffusion-xl-v1-base/lora", and
`modelspec.trigger_phrase` when the trainer gave one with --metadata_trigger_phrase). sd-scripts
writes no `ss_activation_text`; A1111 keeps "activation text" in a side-car .json, which is not
read here. ai-toolkit writes `ss_tag_frequency` = {"1_<trigger>": {"<trigger>": 1}} so that A1111
shows its trigger word, which the tag reading below handles like any other.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
TRIGGER_WORDS = 10

# Prefixes of the two metadata spellings -> family. Order matters ("sdxl" before "sd").
_BASE_VERSION_FAMILIES = (
    ("sdxl", "sdxl"),
    ("sd_v1", "sd1"),
    ("sd_v2", "sd2"),
    ("sd3", "sd3"),
    ("flux", "flux"),
)
_ARCHITECTURE_FAMILIES = (
    ("stable-diffusion-xl", "sdxl"),
    ("stable-diffusion-v1", "sd1"),
    ("stable-diffusion-v2", "sd2"),
    ("stable-diffusion-3", "sd3"),
    ("flux", "flux"),
)


def base_model_family(metadata: Mapping[str, str]) -> str:
    """ "sdxl", "sd1", "sd2", "sd3", "flux", the file's own word for anything else, or "unknown"."""
    version = str(metadata.get("ss_base_model_version", "")).strip().lower()
    if version:
        for prefix, family in _BASE_VERSION_FAMILIES:
            if version.startswith(prefix):
                return family
    architecture = str(metadata.get("modelspec.architecture", "")).strip().lower()
    if architecture:
        for prefix, family in _ARCHITECTURE_FAMILIES:
            if architecture.startswith(prefix):
                return family
    return version or architecture.split("/")[0] or UNKNOWN


def trigger_words(metadata: Mapping[str, str], limit: int = TRIGGER_WORDS) -> tuple[str, ...]:
    """The trainer's trigger phrase when it wrote one, else the most frequent caption tags."""
    phrase = str(metadata.get("modelspec.trigger_phrase", "")).strip()
    if phrase:
        return tuple(dict.fromkeys(part.strip() for part in phrase.split(",") if part.strip()))[:limit]
    return top_tags(metadata.get("ss_tag_frequency"), limit)


def top_tags(raw: object, limit: int = TRIGGER_WORDS) -> tuple[str, ...]:
    """Tags of `ss_tag_frequency` summed over its dataset folders, most frequent first (ties by
    name, so the list is stable)."""
    if not raw:
        return ()
    try:
        folders = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        log.info("ignoring unreadable ss_tag_frequency metadata", extra={"value": str(raw)[:80]})
        return ()
    counts: Counter[str] = Counter()
    if isinstance(folders, dict):
        for tags in folders.values():
            if not isinstance(tags, dict):
                continue
            for tag, count in tags.items():
                tag = str(tag).strip()
                if tag and isinstance(count, (int, float)):
                    counts[tag] += count
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return tuple(tag for tag, _ in ranked[:limit])
