"""A ViT backbone from transformers with transformers' Mask2Former decoder, for 19-class semantic segmentation.

- Backbones: DINOv2 (default), CLIP and SigLIP vision towers (``load_backbone``); any transformers ViT that
  returns ``hidden_states`` with the patch tokens last works.
- Features: the hidden states after 4 blocks (by default at 1/3, 1/2, 2/3 and all of the depth; for 24 blocks
  8, 12, 16, 24), without the CLS and register tokens, as (B, C, h, w) maps.
- Patch size 14: the token grid of an H x W input is (H // 14, W // 14). We keep the pre-trained 14-pixel
  patch embedding as it is (no weight conversion) and resize each token map bilinearly to (H / 16, W / 16),
  so that the pyramid has exactly the strides 4, 8, 16 and 32 that Mask2Former's pixel decoder expects.
  Inputs should be multiples of 32 (512 crops are).
- Pyramid (x4, x2, x1, x0.5): two transposed convolutions, one, identity, max-pooling.
- Decoder: transformers' Mask2Former pixel decoder (multi-scale deformable attention) and masked-attention
  transformer decoder with its Hungarian loss (scipy). Semantic logits are sum over queries of
  softmax(class)[:-1] * sigmoid(mask), as in Mask2Former's semantic inference.
- Everything outside ``backbone`` lives in ``decode_head``: train it in full with ``modules_to_save``; the
  FisherTune candidates are the backbone's linear layers.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn import functional as F
from transformers import Mask2FormerConfig
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerLoss,
    Mask2FormerPixelDecoder,
    Mask2FormerPreTrainedModel,
    Mask2FormerTransformerModule,
)

from ..naming import vit_target_modules
from .classes import IGNORE_INDEX, NUM_CLASSES


def default_feature_blocks(num_blocks: int) -> list[int]:
    """Blocks at 1/3, 1/2, 2/3 and all of the depth: 8, 12, 16, 24 for 24 blocks."""
    return sorted({max(1, round(num_blocks * f)) for f in (1 / 3, 1 / 2, 2 / 3)} | {num_blocks})


class ViTPyramid(nn.Module):
    """Four same-resolution ViT feature maps at stride 16 -> strides 4, 8, 16, 32."""

    def __init__(self, channels: int):
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(channels, channels, 2, stride=2),
            nn.GroupNorm(1, channels),
            nn.GELU(),
            nn.ConvTranspose2d(channels, channels, 2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.down2 = nn.MaxPool2d(2)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.up4(maps[0]), self.up2(maps[1]), maps[2], self.down2(maps[3])]


class DecodeHead(nn.Module):
    """Pyramid + Mask2Former pixel decoder, transformer decoder, class predictor and loss."""

    def __init__(self, channels: int, config: Mask2FormerConfig):
        super().__init__()
        self.pyramid = ViTPyramid(channels)
        self.pixel_decoder = Mask2FormerPixelDecoder(config, feature_channels=[channels] * 4)
        self.transformer = Mask2FormerTransformerModule(in_features=config.feature_size, config=config)
        self.class_predictor = nn.Linear(config.hidden_dim, config.num_labels + 1)
        self.weights = {
            "loss_cross_entropy": config.class_weight,
            "loss_mask": config.mask_weight,
            "loss_dice": config.dice_weight,
        }
        self.criterion = Mask2FormerLoss(config=config, weight_dict=self.weights)
        _init_like_mask2former(self, config)

    def forward(self, maps: list[torch.Tensor]):
        pixel = self.pixel_decoder(self.pyramid(maps))
        out = self.transformer(
            multi_scale_features=pixel.multi_scale_features,
            mask_features=pixel.mask_features,
            output_hidden_states=True,
        )
        classes = [self.class_predictor(state.transpose(0, 1)) for state in out.intermediate_hidden_states]
        return classes, out.masks_queries_logits  # per decoder layer: (B, Q, K+1), (B, Q, H/4, W/4)

    def loss(self, classes, masks, labels: torch.Tensor) -> torch.Tensor:
        num_classes = self.class_predictor.out_features - 1
        mask_labels, class_labels = semantic_to_instances(labels, masks[-1].shape[-2:], num_classes)
        auxiliary = [{"masks_queries_logits": m, "class_queries_logits": c} for m, c in zip(masks[:-1], classes[:-1])]
        losses = self.criterion(
            masks_queries_logits=masks[-1],
            class_queries_logits=classes[-1],
            mask_labels=mask_labels,
            class_labels=class_labels,
            auxiliary_predictions=auxiliary,
        )
        return sum(value * next(w for key, w in self.weights.items() if key in name) for name, value in losses.items())


class ViTMask2Former(nn.Module):
    """``backbone`` (a transformers ViT such as Dinov2Model) + ``decode_head``; returns semantic logits."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = NUM_CLASSES,
        feature_blocks: list[int] | None = None,
        decoder_config: Mask2FormerConfig | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.feature_blocks = feature_blocks or default_feature_blocks(backbone.config.num_hidden_layers)
        if len(self.feature_blocks) != 4:
            raise ValueError(f"feature_blocks must name 4 blocks, got {self.feature_blocks}")
        # CLIP and SigLIP towers take other input sizes only when asked to interpolate their position table.
        accepts = inspect.signature(backbone.forward).parameters
        self._extra_kwargs = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in accepts else {}
        decoder_config = decoder_config or Mask2FormerConfig(num_labels=num_classes)
        decoder_config.num_labels = num_classes
        self.decode_head = DecodeHead(backbone.config.hidden_size, decoder_config)

    def features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Four (B, C, H/16, W/16) maps from the chosen blocks."""
        batch, _, height, width = pixel_values.shape
        patch = self.backbone.config.patch_size
        grid = (height // patch, width // patch)
        states = self.backbone(pixel_values=pixel_values, output_hidden_states=True, **self._extra_kwargs).hidden_states
        maps = []
        for block in self.feature_blocks:
            tokens = states[block][:, -grid[0] * grid[1] :]  # (B, h*w, C): CLS and register tokens dropped
            grid_map = tokens.transpose(1, 2).reshape(batch, -1, *grid)  # (B, C, h, w)
            maps.append(F.interpolate(grid_map, size=(height // 16, width // 16), mode="bilinear", align_corners=False))
        return maps

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> SemanticSegmenterOutput:
        classes, masks = self.decode_head(self.features(pixel_values))
        probabilities = classes[-1].softmax(-1)[..., :-1]  # (B, Q, K), the null class dropped
        logits = torch.einsum("bqk,bqhw->bkhw", probabilities, masks[-1].sigmoid())  # (B, K, H/4, W/4)
        logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        loss = self.decode_head.loss(classes, masks, labels) if labels is not None else None
        return SemanticSegmenterOutput(loss=loss, logits=logits)


def _init_like_mask2former(head: nn.Module, config: Mask2FormerConfig) -> None:
    """Initialise the decoder's modules as transformers' Mask2Former model does.

    The pixel decoder allocates its level embedding with ``torch.Tensor(...)`` and leaves it to the pre-trained
    model class's ``_init_weights``. Built outside that class, as here, it would hold whatever the allocator
    last left in that memory (zeros on fresh pages, NaN or garbage after other work). So every module gets the
    class's own initialisation.
    """
    initializer = Mask2FormerPreTrainedModel(config)
    for module in head.modules():
        initializer._init_weights(module)


def backbone_target_modules(prefix: str = "backbone") -> str:
    """The FisherTune candidates of a ViTMask2Former: the q, k, v, o, fc1 and fc2 linears of the backbone's
    blocks only, under transformers 4.x and 5.x names (``naming.vit_target_modules``).

    A regex, because Mask2Former's decoder layers also have modules named fc1/fc2, and SigLIP's pooling head
    (unused for segmentation) has out_proj/fc1/fc2 outside the blocks.
    """
    return vit_target_modules(prefix)


def load_backbone(name_or_path: str) -> nn.Module:
    """A ViT from transformers by name or local path: DINOv2 (any size, with or without registers), or the
    vision tower of CLIP or SigLIP (taken from a full CLIP/SigLIP checkpoint when one is given)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(name_or_path)
    return getattr(model, "vision_model", model)


def tiny_decoder_config(num_classes: int = NUM_CLASSES, width: int = 32) -> Mask2FormerConfig:
    """A small Mask2Former decoder for tests and the embedded benchmark (the paper's is the default config)."""
    return Mask2FormerConfig(
        num_labels=num_classes,
        feature_size=width,
        mask_feature_size=width,
        hidden_dim=width,
        num_queries=8,
        decoder_layers=3,
        encoder_layers=1,
        dim_feedforward=2 * width,
        encoder_feedforward_dim=2 * width,
        num_attention_heads=2,
        train_num_points=256,
        backbone_config=None,
        use_timm_backbone=False,
    )


def semantic_to_instances(labels: torch.Tensor, size, num_classes: int):
    """(B, H, W) train-id maps -> per image: (n, H', W') binary masks of the classes present, (n,) class ids."""
    labels = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
    masks, classes = [], []
    for label in labels:
        present = [c for c in torch.unique(label).tolist() if c != IGNORE_INDEX and 0 <= c < num_classes]
        ids = torch.tensor(present, dtype=torch.long, device=label.device)
        classes.append(ids)
        masks.append((label[None] == ids[:, None, None]).float())  # (n, H', W')
    return masks, classes
