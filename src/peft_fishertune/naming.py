"""Module names of the supported vision backbones under both transformers lines (4.x and 5.x).

transformers 5 renamed the linear layers of several vision models. The same weight of a DINOv2 block is
``encoder.layer.0.attention.attention.query`` under 4.x and ``encoder.layer.0.attention.q_proj`` under 5.x;
a ViT's MLP is ``intermediate.dense`` / ``output.dense`` under 4.x and ``mlp.fc1`` / ``mlp.fc2`` under 5.x
(and its blocks moved from ``encoder.layer.N`` to ``layers.N``); ``CLIPVisionModel`` and
``SiglipVisionModel`` lost their ``vision_model.`` level. Shapes and layouts did not change.

This module is the one place that knows both schemes:

- ``vit_target_modules(prefix)``: the candidate regex (the attention and MLP linears of the blocks) that
  matches either scheme, used as the default ``target_modules`` and by the segmentation recipe;
- ``block_role(name)``: a module name -> (block, one of q k v o fc1 fc2), for figures and tables;
- ``name_aliases(model)``: each module name of ``model`` -> the name the same module has under the other
  line, so that a config or adapter saved under one line loads under the other;
- ``untargeted_attention(model)``: the known backbones inside ``model`` whose attention linears a targeting
  missed, for a warning.
"""

from __future__ import annotations

import re

from torch import nn

PEFT_PREFIX = "base_model.model."
ROLES = ("q", "k", "v", "o", "fc1", "fc2")
ATTENTION_ROLES = ("q", "k", "v", "o")

# What follows "<layer|layers>.<block>." in a block's module name, per role, in both lines.
_TAILS = {
    "q": ("attention.q_proj", "attention.attention.query", "self_attn.q_proj"),
    "k": ("attention.k_proj", "attention.attention.key", "self_attn.k_proj"),
    "v": ("attention.v_proj", "attention.attention.value", "self_attn.v_proj"),
    "o": ("attention.o_proj", "attention.output.dense", "self_attn.out_proj"),
    "fc1": ("mlp.fc1", "intermediate.dense"),
    "fc2": ("mlp.fc2", "output.dense"),
}
_TAIL_ROLE = {tail: role for role, tails in _TAILS.items() for tail in tails}
_BLOCK = re.compile(r"(?:^|.*\.)layers?\.(\d+)\.(.+)")

# Renames between the lines, per transformers model_type, relative to the model of that type:
# (4.x name, 5.x name) with {i} a block index and {rest} any tail.
_QKV = [
    (f"attention.attention.{old}", f"attention.{new}_proj")
    for old, new in (("query", "q"), ("key", "k"), ("value", "v"))
]
_DINOV2 = [(f"encoder.layer.{{i}}.{old}", f"encoder.layer.{{i}}.{new}") for old, new in _QKV] + [
    ("encoder.layer.{i}.attention.output.dense", "encoder.layer.{i}.attention.o_proj")
]
_VIT = [(f"encoder.layer.{{i}}.{old}", f"layers.{{i}}.{new}") for old, new in _QKV] + [
    ("encoder.layer.{i}.attention.output.dense", "layers.{i}.attention.o_proj"),
    ("encoder.layer.{i}.intermediate.dense", "layers.{i}.mlp.fc1"),
    ("encoder.layer.{i}.output.dense", "layers.{i}.mlp.fc2"),
]
_VISION_TOWER = [("vision_model.encoder.layers.{i}.{rest}", "encoder.layers.{i}.{rest}")]
RENAMES = {
    "dinov2": _DINOV2,
    "dinov2_with_registers": _DINOV2,
    "vit": _VIT,
    "clip_vision_model": _VISION_TOWER,
    "siglip_vision_model": _VISION_TOWER,
}
# Known backbones: model_type -> the part of the model whose blocks FisherTune targets by default.
KNOWN_MODEL_TYPES = {
    "dinov2": "",
    "dinov2_with_registers": "",
    "vit": "",
    "clip_vision_model": "",
    "siglip_vision_model": "",
    "clip": "vision_model",
    "siglip": "vision_model",
}


def vit_target_modules(prefix: str = "") -> str:
    """A regex (peft matches it against whole module names) for the q, k, v, o, fc1 and fc2 linears of the
    blocks of a DINOv2, ViT, CLIP or SigLIP vision model, under transformers 4.x and 5.x names.

    With ``prefix`` (a module path such as ``"backbone"``) only blocks under it match: a decoder's own
    q_proj/fc1 layers, or SigLIP's pooling head, which lies outside the blocks, never do.
    """
    tails = "|".join(re.escape(tail) for tail in _TAIL_ROLE)
    start = rf"{re.escape(prefix)}\.(?:.*\.)?" if prefix else r"(?:.*\.)?"
    return rf"{start}layers?\.\d+\.(?:{tails})"


def default_target_modules(model_type: str) -> str | None:
    """The default candidates for a transformers ``model_type``, or None when it is not a known backbone."""
    if model_type not in KNOWN_MODEL_TYPES:
        return None
    return vit_target_modules(KNOWN_MODEL_TYPES[model_type])


def block_role(name: str) -> tuple[int, str] | None:
    """(block index, role) of a block linear's module name in either line, e.g. ``(3, "q")`` for
    ``backbone.encoder.layer.3.attention.attention.query``; None for any other module."""
    match = _BLOCK.fullmatch(name)
    if match is None or match.group(2) not in _TAIL_ROLE:
        return None
    return int(match.group(1)), _TAIL_ROLE[match.group(2)]


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"(\{i\}|\{rest\})", template)
    regex = "".join(
        r"(?P<i>\d+)" if part == "{i}" else r"(?P<rest>.+)" if part == "{rest}" else re.escape(part) for part in parts
    )
    return re.compile(regex)


_COMPILED = {
    model_type: [(_pattern(old), old, _pattern(new), new) for old, new in rules]
    for model_type, rules in RENAMES.items()
}


def _rename(relative: str, model_type: str) -> str | None:
    """The other line's name of a module at ``relative`` (a name inside a model of ``model_type``), or None."""
    for old_re, old, new_re, new in _COMPILED.get(model_type, ()):
        for source, target in ((old_re, new), (new_re, old)):
            match = source.fullmatch(relative)
            if match:
                return target.format(**match.groupdict())
    return None


def _model_type(module: nn.Module) -> str | None:
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    return model_type if isinstance(model_type, str) else None


def _backbones(model: nn.Module, types) -> list[tuple[str, nn.Module, str]]:
    """(prefix, module, model_type) of each outermost module of ``model`` whose model_type is in ``types``."""
    found = []
    for prefix, module in model.named_modules():
        model_type = _model_type(module)
        if model_type not in types:
            continue
        if any(outer == "" or prefix.startswith(outer + ".") for outer, _, _ in found):
            continue
        found.append((prefix, module, model_type))
    return found


def name_aliases(model: nn.Module) -> dict[str, str]:
    """Each module name of ``model`` that the other transformers line names differently -> that other name.

    Names are full paths in ``model``. Every known backbone inside it counts, nested ones included (a
    ViTForImageClassification's ``vit``), whatever wraps it (a PeftModel, a segmentation model).
    """
    aliases: dict[str, str] = {}
    for prefix, module in model.named_modules():
        model_type = _model_type(module)
        if model_type not in RENAMES:
            continue
        lead = f"{prefix}." if prefix else ""
        for relative, _ in module.named_modules():
            other = _rename(relative, model_type) if relative else None
            if other is not None:
                aliases.setdefault(lead + relative, lead + other)
    return aliases


def untargeted_attention(model: nn.Module, is_targeted) -> list[dict]:
    """The known backbones of ``model`` in which ``is_targeted(module)`` holds for none of the attention linears.

    Returns one entry per such backbone: its ``prefix``, ``model_type``, the attention linears' names in this
    transformers line (``attention``), and what was targeted in it (``matched``: role or name -> count).
    """
    missed = []
    for prefix, backbone, model_type in _backbones(model, KNOWN_MODEL_TYPES):
        attention, matched = set(), {}
        for relative, module in backbone.named_modules():
            place = block_role(relative)
            if is_targeted(module):
                key = place[1] if place else relative
                matched[key] = matched.get(key, 0) + 1
            elif place and place[1] in ATTENTION_ROLES and isinstance(module, nn.Linear):
                attention.add(_BLOCK.fullmatch(relative).group(2))
        if attention and not any(role in matched for role in ATTENTION_ROLES):
            missed.append(
                {"prefix": prefix, "model_type": model_type, "attention": sorted(attention), "matched": matched}
            )
    return missed


def rename_keys(mapping: dict, names, aliases: dict[str, str], separator: str | None = ".fishertune_") -> dict:
    """``mapping`` with each key renamed whose module part (before ``separator``; the whole key when it is None)
    names no module in ``names`` but is the other line's name of one that does. peft's ``base_model.model.``
    prefix may be on either side; a renamed key keeps the prefix it had."""
    known = {name.removeprefix(PEFT_PREFIX) for name in names}
    reverse = {other.removeprefix(PEFT_PREFIX): name.removeprefix(PEFT_PREFIX) for name, other in aliases.items()}
    renamed = {}
    for key, value in mapping.items():
        module, sep, rest = (key, "", "") if separator is None else key.partition(separator)
        bare = module.removeprefix(PEFT_PREFIX)
        if (sep or separator is None) and bare not in known and bare in reverse:
            key = module[: len(module) - len(bare)] + reverse[bare] + sep + rest
        renamed[key] = value
    return renamed
