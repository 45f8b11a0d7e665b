"""Which layer of the loaded model a LoRA file's key belongs to.

A LoRA file is a flat dict of `<layer name><suffix>` keys (docs/lora.md). The suffix says which
factor it is (up, down, mid, alpha); the layer name says where it goes, in one of several
namings:

- kohya: `lora_unet_` + the UNet module path with dots replaced by underscores, in the original
  SGM/ldm naming (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`, how sd-scripts writes SDXL
  LoRAs) or in diffusers naming (`down_blocks_1_attentions_0_...`); `lora_te1_` / `lora_te_` and
  `lora_te2_` + the Hugging Face CLIP path with underscores;
- diffusers/PEFT: `unet.` + the dotted diffusers path (or no prefix), `text_encoder.` and
  `text_encoder_2.` + the Hugging Face path (older diffusers files add `.processor.` and say
  `to_q_lora`); ComfyUI also takes `diffusion_model.` + the dotted SGM path.

Underscore-joined names are ambiguous (module names themselves hold underscores: `to_q`,
`proj_in`, `ff_net_0_proj`), so nothing here splits them by rule: every name is looked up in a
table built from the model's own module names (`name.replace('.', '_')` -> module), which is
exact whatever the model's size.

SGM names are derived from the UNet's structure (its down/mid/up blocks and how many resnets,
attentions and resamplers each holds), the same walk ldm's `UNetModel` makes when it numbers
`input_blocks` / `middle_block` / `output_blocks`; so the tiny demo UNet and the real SDXL both
map without a hard-coded layout. diffusers ships a converter
(`lora_conversion_utils._maybe_map_sgm_blocks_to_diffusers` + `_convert_unet_lora_key`). It gives
the same names for the SDXL and demo layouts (checked when this was written), but it is private
API, reads only an integer `layers_per_block` from the config, renames by substring replacement
(an Upsample at `output_blocks.N.1` of an up block without attention would become `attentions`)
and raises on any key it does not know where an API should report it; so it is not used.
Tests check this map against an independent diffusers -> ldm converter
(tests/support/sdxl_single_file.py) on the demo and the full-size SDXL UNet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

UNET, TE1, TE2 = "unet", "te1", "te2"
COMPONENTS = (UNET, TE1, TE2)
# The text encoders in SDXL's order (LoadedModel.text_encoders[i] is TEXT_ENCODERS[i]).
TEXT_ENCODERS = (TE1, TE2)

# Factor suffixes, longest first so that `.lora_linear_layer.up.weight` is not read as
# `.up.weight` of a layer called `...lora_linear_layer`.
FACTOR_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_mid.weight", "mid"),
    (".lora_up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"),
    ("_lora.up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".alpha", "alpha"),
)

# Keys of adapter types whose delta is not up @ down (docs/lora.md): a file holding any of them
# is refused as a whole, since applying only its plain-LoRA part would give a different image.
UNSUPPORTED_MARKERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\.hada_(w1_a|w1_b|w2_a|w2_b|t1|t2)$"), "LoHa (hada_* keys)"),
    (re.compile(r"\.lokr_(w1|w2|w1_a|w1_b|w2_a|w2_b|t1|t2)$"), "LoKr (lokr_* keys)"),
    (re.compile(r"\.(dora_scale|lora_magnitude_vector)$"), "DoRA (dora_scale keys)"),
    (re.compile(r"\.(diff|diff_b)$"), "LyCORIS full-weight diff (diff keys)"),
    (re.compile(r"\.(oft_blocks|oft_diag|oft_R\.weight)$"), "OFT/BOFT (oft_* keys)"),
    (re.compile(r"\.(a1|a2|b1|b2)\.weight$"), "GLoRA (a1/b1 keys)"),
    (re.compile(r"\.(w_norm|b_norm)$"), "LyCORIS norm-layer tuning (w_norm keys)"),
)

# Layer-name prefixes: (prefix, component, naming). "underscore" names are looked up whole in
# the underscore table; "dotted" names in the dotted table. Longest prefixes first.
_PREFIXES: tuple[tuple[str, str, str], ...] = (
    ("lora_unet_", UNET, "underscore"),
    ("lora_te1_", TE1, "underscore"),
    ("lora_te2_", TE2, "underscore"),
    ("lora_te_", TE1, "underscore"),  # SD1-style single text encoder: CLIP-L is te1
    ("text_encoder_2.", TE2, "dotted"),
    ("text_encoder.", TE1, "dotted"),
    ("model.diffusion_model.", UNET, "dotted"),
    ("diffusion_model.", UNET, "dotted"),
    ("base_model.model.", UNET, "dotted"),  # a PEFT file saved from PeftModel(unet)
    ("unet.", UNET, "dotted"),
)

# ldm ResBlock layer names for diffusers ResnetBlock2D layers.
_SGM_RESNET = {
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_SGM_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_out": "out.2",
}
# Older diffusers text-encoder LoRAs name CLIP's projections like the UNet's attention.
_TE_ATTENTION_ALIASES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def split_key(key: str) -> tuple[str, str] | None:
    """`X.lora_up.weight` -> (`X`, "up"); None for a key that is no LoRA factor."""
    for suffix, part in FACTOR_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], part
    return None


def unsupported_kind(key: str) -> str | None:
    """The adapter type a key belongs to when it is one this service refuses (LoHa, LoKr, ...)."""
    for pattern, kind in UNSUPPORTED_MARKERS:
        if pattern.search(key):
            return kind
    return None


def is_target(module: nn.Module) -> bool:
    """Layers a LoRA may patch: Linear, and ungrouped zero-padded Conv2d."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"


def sgm_names(unet: nn.Module) -> dict[str, str]:
    """diffusers module path -> SGM/ldm module path, for every target layer of `unet`.

    ldm numbers the down path flat: input block 0 is conv_in, then per down block one entry per
    resnet ([ResBlock, (SpatialTransformer)]) and, unless it is the last, one for the Downsample
    (`.0.op`). The mid block interleaves resnets and attentions. The up path has one entry per
    resnet with the Upsample appended to the block's last entry (`.1.conv`, or `.2.conv` when
    the entry also has attention). Counting the blocks' own children reproduces this for any
    configuration.
    """
    prefixes: dict[str, tuple[str, bool]] = {}  # diffusers prefix -> (sgm prefix, is a resnet)

    def attentions_of(block: nn.Module) -> int:
        attentions = getattr(block, "attentions", None)
        return len(attentions) if attentions is not None else 0

    index = 1
    for i, block in enumerate(unet.down_blocks):
        with_attention = attentions_of(block)
        for j in range(len(block.resnets)):
            prefixes[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{index}.0", True)
            if j < with_attention:
                prefixes[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{index}.1", False)
            index += 1
        if getattr(block, "downsamplers", None):
            prefixes[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", False)
            index += 1
    mid = getattr(unet, "mid_block", None)
    if mid is not None:
        mid_attention = attentions_of(mid)
        step = 2 if mid_attention else 1
        for j in range(len(mid.resnets)):
            prefixes[f"mid_block.resnets.{j}"] = (f"middle_block.{j * step}", True)
        for j in range(mid_attention):
            prefixes[f"mid_block.attentions.{j}"] = (f"middle_block.{2 * j + 1}", False)
    index = 0
    for i, block in enumerate(unet.up_blocks):
        with_attention = attentions_of(block)
        last = len(block.resnets) - 1
        for j in range(len(block.resnets)):
            prefixes[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{index}.0", True)
            if j < with_attention:
                prefixes[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{index}.1", False)
            if j == last and getattr(block, "upsamplers", None):
                slot = 2 if j < with_attention else 1
                prefixes[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{index}.{slot}.conv", False)
            index += 1

    mapping: dict[str, str] = {}
    for name, module in unet.named_modules():
        if not is_target(module):
            continue
        if name in _SGM_TOP_LEVEL:
            mapping[name] = _SGM_TOP_LEVEL[name]
            continue
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix not in prefixes:
                continue
            target, is_resnet = prefixes[prefix]
            rest = ".".join(parts[cut:])
            if is_resnet:
                if rest not in _SGM_RESNET:
                    break  # a resnet layer ldm does not have: no SGM name
                rest = _SGM_RESNET[rest]
            mapping[name] = f"{target}.{rest}" if rest else target
            break
    return mapping


@dataclass
class ComponentTable:
    """Lookup tables from every accepted spelling of a layer name to its module path."""

    root: nn.Module
    modules: dict[str, nn.Module] = field(default_factory=dict)  # dotted diffusers/HF path -> module
    dotted: dict[str, str] = field(default_factory=dict)  # accepted dotted spelling -> path
    underscore: dict[str, str | None] = field(
        default_factory=dict
    )  # underscore spelling -> path (None: ambiguous)

    def add(self, spelling: str, path: str) -> None:
        self.dotted.setdefault(spelling, path)
        flat = spelling.replace(".", "_")
        if self.underscore.get(flat, path) != path:
            self.underscore[flat] = None  # two modules flatten to the same name: refuse to guess
        else:
            self.underscore[flat] = path


def _text_encoder_table(encoder: nn.Module) -> ComponentTable:
    table = ComponentTable(encoder)
    for name, module in encoder.named_modules():
        if not is_target(module):
            continue
        table.modules[name] = module
        table.add(name, name)
        # transformers >= 5 builds CLIPTextModel without the `text_model.` level that
        # CLIPTextModelWithProjection (and every LoRA file) still has: accept both spellings.
        if name.startswith("text_model."):
            table.add(name.removeprefix("text_model."), name)
        else:
            table.add(f"text_model.{name}", name)
    return table


def _unet_table(unet: nn.Module) -> ComponentTable:
    table = ComponentTable(unet)
    for name, module in unet.named_modules():
        if is_target(module):
            table.modules[name] = module
            table.add(name, name)
    for name, sgm in sgm_names(unet).items():
        table.add(sgm, name)
    return table


@dataclass(frozen=True)
class Placement:
    component: str
    path: str  # the module's dotted path inside its component


class LayerIndex:
    """Where each LoRA layer name of a model goes: built once per loaded model."""

    def __init__(self, unet: nn.Module, text_encoders: tuple[nn.Module, nn.Module]) -> None:
        self.tables: dict[str, ComponentTable] = {
            UNET: _unet_table(unet),
            TE1: _text_encoder_table(text_encoders[0]),
            TE2: _text_encoder_table(text_encoders[1]),
        }

    @classmethod
    def from_model(cls, model) -> LayerIndex:
        """From a t2i.models.loader.LoadedModel."""
        return cls(model.unet, tuple(model.text_encoders))

    def module(self, placement: Placement) -> nn.Module:
        return self.tables[placement.component].modules[placement.path]

    def place(self, layer_name: str) -> Placement | str:
        """The module a layer name of a LoRA file means, or the reason it means none."""
        for prefix, component, naming in _PREFIXES:
            if layer_name.startswith(prefix):
                rest = layer_name[len(prefix) :]
                break
        else:
            component, naming, rest = UNET, "dotted", layer_name
        table = self.tables[component]
        if naming == "underscore":
            if rest in table.underscore:
                path = table.underscore[rest]
                if path is None:
                    return f"{layer_name!r} is ambiguous: several {component} modules flatten to {rest!r}"
                return Placement(component, path)
            return f"no {component} layer is named {rest!r}"
        for spelling in _dotted_spellings(rest, component):
            if spelling in table.dotted:
                return Placement(component, table.dotted[spelling])
        return f"no {component} layer is named {rest!r}"


def _dotted_spellings(name: str, component: str) -> list[str]:
    """The spellings older diffusers files use for the same layer, most literal first."""
    spellings = [name]
    plain = name.replace(".processor.", ".")
    if plain != name:
        spellings.append(plain)
    for candidate in list(spellings):
        head, _, last = candidate.rpartition(".")
        if component == UNET and last == "to_out":
            spellings.append(f"{candidate}.0")  # attention processors called to_out.0 `to_out`
        elif component != UNET and last in _TE_ATTENTION_ALIASES:
            spellings.append(f"{head}.{_TE_ATTENTION_ALIASES[last]}" if head else _TE_ATTENTION_ALIASES[last])
    return spellings
