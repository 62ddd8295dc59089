"""The vision-language model: encode -> project -> fill the ``<image>`` slots -> HF causal LM -> loss.

ARCHITECTURE.md "Data flow", steps 2-3 (METHOD.md section 2 for the visual token pipeline). No Lightning here:
inference and unit tests use this module directly. The backbone is an unmodified transformers model, called
with ``inputs_embeds`` and explicit ``position_ids``, so its logits equal the plain HF model's on the same
embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from skipvision.data.chat import IGNORE_INDEX
from skipvision.encoders.base import VisionEncoder
from skipvision.registry import BACKBONES, ENCODERS, PROJECTORS


class ImageTokenMismatchError(ValueError):
    """The ``<image>`` slots in the token ids do not match the images given (per sample)."""


@dataclass
class VLMOutput:
    logits: torch.Tensor  # [B, T, V]
    loss: torch.Tensor | None = None  # scalar: mean CE over answer tokens


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only: 0..n-1 after any left padding. [B, T] -> [B, T]"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``labels[:, t+1]`` from position t, over labels != -100."""
    pred = logits[:, :-1].flatten(0, 1).float()  # [B*(T-1), V]
    target = labels[:, 1:].flatten()  # [B*(T-1)]
    total = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp(min=1)


class VisionLanguageModel(nn.Module):
    """LLaVA-style VLM: ``encoder`` [M, N, C_v] -> ``projector`` [M, N, D] -> slots of the ``backbone`` input."""

    def __init__(
        self, encoder: VisionEncoder, projector: nn.Module, backbone: PreTrainedModel, image_token_id: int
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.backbone = backbone
        self.image_token_id = image_token_id

    @classmethod
    def from_specs(
        cls,
        encoder: Any,
        projector: Any,
        backbone: Any,
        tokenizer: PreTrainedTokenizerBase,
        image_token: str = "<image>",
    ) -> VisionLanguageModel:
        """Build every part from registry specs; sizes and the vocabulary are wired from the tokenizer."""
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {image_token!r} token")
        enc = ENCODERS.build(encoder)
        llm = BACKBONES.build(backbone, vocab_size=len(tokenizer))
        proj = PROJECTORS.build(projector, in_dim=enc.out_dim, out_dim=llm.config.hidden_size)
        return cls(enc, proj, llm, image_token_id)

    @property
    def num_image_tokens(self) -> int:
        """Slots one ``<image>`` placeholder expands to."""
        return self.encoder.num_tokens

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[M, 3, H, W] -> [M, N, D] visual tokens in the LLM's embedding space."""
        return self.projector(self.encoder(pixel_values))  # [M, N, D]

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        num_images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text embeddings with visual tokens written into the image slots. [B, T] -> [B, T, D]

        ``num_images`` [B] (images per sample, in order) lets every sample's slot count be checked, so features
        can never land in another sample's slots.
        """
        embeds = self.backbone.get_input_embeddings()(input_ids)  # [B, T, D]
        slots = input_ids == self.image_token_id  # [B, T]
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if num_images is None:
            num_images = torch.tensor([n_images]) if input_ids.shape[0] == 1 else None
        self._check_slots(slots, n_images, num_images)
        if n_images == 0:
            return embeds
        feats = self.image_features(pixel_values).to(embeds.dtype)  # [M, N, D]
        return embeds.masked_scatter(slots.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))  # [B, T, D]

    def _check_slots(self, slots: torch.Tensor, n_images: int, num_images: torch.Tensor | None) -> None:
        per_image = self.num_image_tokens
        if num_images is not None:
            if int(num_images.sum()) != n_images:
                raise ImageTokenMismatchError(
                    f"num_images sums to {int(num_images.sum())} but {n_images} images were given"
                )
            want = num_images.to(slots.device) * per_image  # [B]
            have = slots.sum(-1)  # [B]
            bad = (want != have).nonzero().flatten().tolist()
            if bad:
                i = bad[0]
                raise ImageTokenMismatchError(
                    f"sample {i} has {int(have[i])} image-token slots but {int(num_images[i])} image(s) x "
                    f"{per_image} tokens = {int(want[i])} are needed (mismatched samples: {bad})"
                )
        elif int(slots.sum()) != n_images * per_image:
            raise ImageTokenMismatchError(
                f"the batch has {int(slots.sum())} image-token slots but {n_images} image(s) x {per_image} "
                f"tokens = {n_images * per_image} are needed"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        num_images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> VLMOutput:
        embeds = self.embed(input_ids, pixel_values, num_images)  # [B, T, D]
        out = self.backbone(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
            use_cache=False,
        )
        loss = None if labels is None else next_token_loss(out.logits, labels)
        return VLMOutput(logits=out.logits, loss=loss)
