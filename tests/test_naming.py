"""Both transformers lines: default targets, the untargeted-attention warning, the recipe regex, the per-block
tables, and adapters saved under 4.x and 5.x loading under the line that runs the tests."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)

import peft_fishertune  # noqa: F401
from peft_fishertune import FisherTuneConfig, FisherTuneLayer, vit_target_modules
from peft_fishertune.naming import ROLES, block_role, name_aliases
from peft_fishertune.seg import backbone_target_modules
from peft_fishertune.seg.embedded import block_matrix

SIZE = dict(
    hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=4
)
FIXTURES = Path(__file__).parent / "fixtures" / "cross_version"
LINE = f"{transformers.__version__.split('.')[0]}.x"
BACKBONES = {
    "dinov2": (Dinov2Model, Dinov2Config),
    "vit": (ViTModel, ViTConfig),
    "clip-vision": (CLIPVisionModel, CLIPVisionConfig),
    "siglip-vision": (SiglipVisionModel, SiglipVisionConfig),
}
# Every block linear of each backbone in both lines (the names transformers 4.56 and 5.24 give them).
NAMES_4 = {
    "encoder.layer.3.attention.attention.query": (3, "q"),
    "encoder.layer.3.attention.attention.key": (3, "k"),
    "encoder.layer.3.attention.attention.value": (3, "v"),
    "encoder.layer.3.attention.output.dense": (3, "o"),
    "encoder.layer.3.mlp.fc1": (3, "fc1"),
    "encoder.layer.3.mlp.fc2": (3, "fc2"),
    "encoder.layer.3.intermediate.dense": (3, "fc1"),  # ViT
    "encoder.layer.3.output.dense": (3, "fc2"),  # ViT
    "vision_model.encoder.layers.3.self_attn.q_proj": (3, "q"),  # CLIP / SigLIP
    "vision_model.encoder.layers.3.self_attn.out_proj": (3, "o"),
}
NAMES_5 = {
    "encoder.layer.3.attention.q_proj": (3, "q"),
    "encoder.layer.3.attention.k_proj": (3, "k"),
    "encoder.layer.3.attention.v_proj": (3, "v"),
    "encoder.layer.3.attention.o_proj": (3, "o"),
    "layers.3.attention.q_proj": (3, "q"),  # ViT
    "layers.3.mlp.fc1": (3, "fc1"),
    "layers.3.mlp.fc2": (3, "fc2"),
    "encoder.layers.3.self_attn.k_proj": (3, "k"),
    "encoder.layers.3.mlp.fc2": (3, "fc2"),
}
NOT_CANDIDATES = [
    "pooler.dense",
    "head.attention.out_proj",  # SigLIP's pooling head
    "head.mlp.fc1",
    "embeddings.patch_embeddings.projection",
    "encoder.layer.3.layernorm_before",
]


def ours(caught) -> list[str]:
    return [str(w.message) for w in caught if "attention linear layers" in str(w.message)]


def adapted_roles(model) -> dict[str, int]:
    counts = {}
    for name, module in model.named_modules():
        if isinstance(module, FisherTuneLayer):
            place = block_role(name.removeprefix("base_model.model."))
            assert place is not None, name
            counts[place[1]] = counts.get(place[1], 0) + 1
    return counts


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_default_targets_every_block_linear_without_a_warning(backbone):
    model_cls, config_cls = BACKBONES[backbone]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(model_cls(config_cls(**SIZE)), FisherTuneConfig(init_selection="random"))
    assert not ours(caught)
    assert adapted_roles(model) == {role: SIZE["num_hidden_layers"] for role in ROLES}


def test_a_targeting_without_attention_layers_warns_and_names_what_it_matched():
    with pytest.warns(UserWarning, match=r"none of the attention linear layers of the dinov2 model.*fc1 x2, fc2 x2"):
        model = get_peft_model(Dinov2Model(Dinov2Config(**SIZE)), FisherTuneConfig(target_modules=["fc1", "fc2"]))
    assert adapted_roles(model) == {"fc1": 2, "fc2": 2}


def test_a_backbone_inside_another_model_is_checked_too():
    class Segmenter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Dinov2Model(Dinov2Config(**SIZE))
            self.decode_head = torch.nn.Linear(16, 3)

    with pytest.warns(UserWarning, match=r"dinov2 model at 'backbone'"):
        get_peft_model(Segmenter(), FisherTuneConfig(target_modules=r"backbone\..*mlp\.fc1"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(Segmenter(), FisherTuneConfig(target_modules=vit_target_modules("backbone")))
    assert not ours(caught)
    assert adapted_roles(model) == {role: 2 for role in ROLES}


@pytest.mark.parametrize("names", [["q_proj", "v_proj"], ["query", "value"]], ids=["5.x-names", "4.x-names"])
def test_target_names_of_either_line_select_the_same_layers(names):
    model = get_peft_model(Dinov2Model(Dinov2Config(**SIZE)), FisherTuneConfig(target_modules=names))
    assert adapted_roles(model) == {"q": 2, "v": 2}


@pytest.mark.parametrize("name,place", list(NAMES_4.items()) + list(NAMES_5.items()))
def test_block_role_and_the_recipe_regex_know_both_lines(name, place):
    import re

    assert block_role(name) == place
    assert block_role(f"backbone.{name}") == place
    assert re.fullmatch(backbone_target_modules(), f"backbone.{name}")
    assert re.fullmatch(vit_target_modules(), name)
    assert not re.fullmatch(backbone_target_modules(), f"decode_head.{name}")


@pytest.mark.parametrize("name", NOT_CANDIDATES)
def test_the_candidate_regex_leaves_other_modules_alone(name):
    import re

    assert block_role(name) is None
    assert not re.fullmatch(vit_target_modules(), name)
    assert not re.fullmatch(backbone_target_modules(), f"backbone.{name}")


def test_the_selection_table_has_all_six_columns_under_either_line():
    for names in (NAMES_4, NAMES_5):
        table = block_matrix({f"backbone.{n}": 1.0 for n in names}, blocks=4)
        assert table[3].tolist() == [1.0] * 6
    with pytest.raises(ValueError, match="decode_head.fc1"):
        block_matrix({"decode_head.fc1": 1.0}, blocks=4)


def test_aliases_map_each_block_linear_to_the_other_lines_name():
    aliases = name_aliases(Dinov2Model(Dinov2Config(**SIZE)))
    other = {"4.x": "encoder.layer.1.attention.q_proj", "5.x": "encoder.layer.1.attention.attention.query"}[LINE]
    mine = {"5.x": "encoder.layer.1.attention.q_proj", "4.x": "encoder.layer.1.attention.attention.query"}[LINE]
    assert aliases[mine] == other
    assert "encoder.layer.1.mlp.fc1" not in aliases  # the same in both lines


def load_base(model_cls, path: Path):
    """The saved backbone. transformers 5 writes a CLIPVisionModel without its ``vision_model.`` level, which
    transformers 4 does not read back (its limit, not the adapter's): those weights get the level here."""
    base, info = model_cls.from_pretrained(path, output_loading_info=True)
    if info["missing_keys"]:
        assert LINE == "4.x" and all(k.startswith("vision_model.") for k in info["missing_keys"]), info
        state = {f"vision_model.{k}": v for k, v in load_file(path / "model.safetensors").items()}
        assert not base.load_state_dict(state, strict=False).missing_keys
    return base.eval()


CASES = sorted(p.relative_to(FIXTURES).as_posix() for p in FIXTURES.glob("*/*") if p.is_dir())


def test_fixtures_of_both_lines_are_present():
    assert {case.split("/")[0] for case in CASES} == {"4.x", "5.x"}
    assert len(CASES) == 8


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True], ids=["load", "low-cpu-mem"])
@pytest.mark.parametrize("case", CASES)
def test_an_adapter_saved_under_either_line_loads_with_equal_outputs(case, low_cpu_mem_usage):
    """Saved by tests/fixtures/make_cross_version.py under transformers 4.56 and 5.24; loaded here."""
    root = FIXTURES / case
    meta = json.loads((root / "meta.json").read_text())
    base = load_base(getattr(transformers, meta["class"]), root / "base")
    model = PeftModel.from_pretrained(base, root / "adapter", low_cpu_mem_usage=low_cpu_mem_usage).eval()
    io = load_file(root / "io.safetensors")
    layers = [m for m in model.modules() if isinstance(m, FisherTuneLayer)]
    assert len(layers) == len(meta["adapted"])
    assert all(layer.active_count("default") > 0 for layer in layers)
    with torch.no_grad():
        out = model(pixel_values=io["pixel_values"]).last_hidden_state
    torch.testing.assert_close(out, io["expected"], rtol=1e-5, atol=1e-5)
    with model.disable_adapter(), torch.no_grad():
        without = model(pixel_values=io["pixel_values"]).last_hidden_state
    assert (without - io["expected"]).abs().max() > 1e-3  # the delta matters, so a misplaced one would show
