"""ViT + Mask2Former segmentation model: features, pyramid strides, loss, and FisherTune on the backbone only."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_fishertune import FisherTuneConfig, FisherTuneLayer, calibrate
from peft_fishertune.seg.model import (
    ViTMask2Former,
    backbone_target_modules,
    default_feature_blocks,
    tiny_decoder_config,
)

from .models import tiny_dinov2


def build(seed=0, blocks=4):
    torch.manual_seed(seed)
    return ViTMask2Former(tiny_dinov2(blocks, image_size=64), decoder_config=tiny_decoder_config())


def batch(seed=0, height=64, width=96):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 19, (2, height, width), generator=generator)
    labels[:, :4] = 255
    return torch.randn(2, 3, height, width, generator=generator), labels


@pytest.mark.parametrize("blocks,expected", [(24, [8, 12, 16, 24]), (12, [4, 6, 8, 12]), (4, [1, 2, 3, 4])])
def test_default_feature_blocks(blocks, expected):
    assert default_feature_blocks(blocks) == expected


def test_features_and_pyramid_strides():
    """Token maps (H/14) are resized to H/16; the pyramid gives strides 4, 8, 16, 32."""
    model = build()
    images, _ = batch()
    maps = model.features(images)
    assert [tuple(m.shape[-2:]) for m in maps] == [(4, 6)] * 4
    pyramid = model.decode_head.pyramid(maps)
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_logits_loss_and_training_step():
    """Logits at input size, a finite Hungarian loss that a few steps reduce on a fixed batch."""
    model = build()
    images, labels = batch()
    out = model(pixel_values=images, labels=labels)
    assert out.logits.shape == (2, 19, 64, 96) and torch.isfinite(out.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = model(pixel_values=images, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_fishertune_targets_the_backbone_only():
    """With the regex candidates and decode_head in modules_to_save, no FisherTune layer is in the decoder,
    every backbone linear is a candidate, and a calibration pass runs on the Mask2Former loss."""
    model = get_peft_model(
        build(),
        FisherTuneConfig(target_modules=backbone_target_modules(), modules_to_save=["decode_head"], density_max=0.2),
    )
    layers = [name for name, m in model.named_modules() if isinstance(m, FisherTuneLayer)]
    assert layers and all(".backbone." in name for name in layers) and len(layers) == 4 * 6
    images, labels = batch()
    scores = calibrate(model, [{"pixel_values": images, "labels": labels}], steps=1, progress=False)
    model.base_model.select(scores)
    assert sum(model.base_model.active_counts().values()) > 0
    trainable = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"backbone", "decode_head"}


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_other_vfm_families(family, tmp_path):
    """CLIP and SigLIP vision towers (also from a full CLIP checkpoint) work as backbones at any input size,
    and FisherTune finds their q/k/v/out and MLP layers."""
    from transformers import CLIPConfig, CLIPModel, SiglipVisionConfig, SiglipVisionModel

    from peft_fishertune.seg.model import load_backbone

    torch.manual_seed(0)
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=56, patch_size=14
    )
    if family == "clip":
        CLIPModel(
            CLIPConfig(
                vision_config=vision,
                text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
            )
        ).save_pretrained(tmp_path)
    else:
        SiglipVisionModel(SiglipVisionConfig(**vision)).save_pretrained(tmp_path)
    model = ViTMask2Former(load_backbone(str(tmp_path)), decoder_config=tiny_decoder_config())
    images, labels = batch()
    out = model(pixel_values=images, labels=labels)
    assert out.logits.shape == (2, 19, 64, 96) and torch.isfinite(out.loss)
    peft_model = get_peft_model(
        model,
        FisherTuneConfig(
            target_modules=backbone_target_modules(), modules_to_save=["decode_head"], init_selection="random"
        ),
    )
    assert sum(isinstance(m, FisherTuneLayer) for m in peft_model.modules()) == 4 * 6
    from peft_fishertune.seg.cli import resolve_perturb_module

    assert resolve_perturb_module(model, "auto") == "backbone.embeddings.patch_embedding"  # CLIP/SigLIP's name


def test_auto_perturb_module_is_the_patch_embedding_or_a_clear_error():
    from peft_fishertune.seg.cli import resolve_perturb_module

    model = build(seed=0)
    assert resolve_perturb_module(model, "auto") == "backbone.embeddings.patch_embeddings"  # DINOv2's name
    assert resolve_perturb_module(model, None) is None
    assert resolve_perturb_module(model, "backbone.embeddings") == "backbone.embeddings"
    with pytest.raises(ValueError, match="perturb_module: auto .*found neither"):
        resolve_perturb_module(torch.nn.Linear(2, 2), "auto")


def test_decoder_is_initialised_whatever_memory_it_gets():
    """Mask2Former's pixel decoder allocates its level embedding uninitialised (its model class initialises it).
    Built after memory full of NaN was freed, the decoder must still be finite and the same for one seed: this
    was a first-step NaN loss that came and went with what ran before in the process."""
    built = []
    for _ in range(2):
        poison = [torch.full((96,), float("nan")) for _ in range(2000)]
        del poison
        built.append(build(seed=0))
    for model in built:
        assert all(torch.isfinite(t).all() for t in (*model.parameters(), *model.buffers()))
    for a, b in zip(built[0].parameters(), built[1].parameters()):
        assert torch.equal(a, b)
