"""The vision-language model: encode -> project -> skip-vision tokens -> fill the ``<image>`` slots -> HF causal
LM with Skip-FFN -> loss.

The method: docs/method.md "Token pipeline" (policy split, merge, summaries), docs/method.md "Slot layout",
docs/method.md "The Skip-FFN layer" and docs/method.md "Masking ablation". No Lightning here: inference and unit
tests use this module directly. The backbone is an unmodified transformers model, called with ``inputs_embeds`` and
explicit ``position_ids``; with the ``none`` policy its logits equal the plain HF model's on the same embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from skipvision.adapters import decoder_layers
from skipvision.data.chat import IGNORE_INDEX
from skipvision.data.samples import IMAGE_PLACEHOLDER
from skipvision.data.tokenizer import TokenizerError
from skipvision.encoders.base import VisionEncoder
from skipvision.errors import MethodError, SkipvisionError
from skipvision.registry import BACKBONES, ENCODERS, PROJECTORS
from skipvision.skip.ffn import SkipFFN
from skipvision.skip.in_llm import method_steps
from skipvision.skip.layout import DropStage, VisualTokens
from skipvision.skip.masking import text_to_skipped_mask
from skipvision.skip.policies.base import NeedsClsAttention
from skipvision.skip.visual import SkipVisionTokens


class ImageTokenMismatchError(SkipvisionError, ValueError):
    """The ``<image>`` slots in the token ids do not match the images given (per sample)."""


@dataclass
class VLMOutput:
    logits: torch.Tensor  # [B, T, V]
    loss: torch.Tensor | None = None  # scalar: mean CE over answer tokens (+ a learned policy's aux loss)
    aux_loss: torch.Tensor | None = None


@dataclass
class Embedded:
    embeds: torch.Tensor  # [B, T, D] text embeddings with the visual slots filled
    ffn_mask: torch.Tensor | None = None  # [B, T] bool, False at skipped slots; None: every token runs the FFN
    aux_loss: torch.Tensor | None = None
    visual_slots: torch.Tensor | None = None  # [B, T] bool, True at every image slot (R, s_R, S, s_S)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only: 0..n-1 after any left padding. [B, T] -> [B, T]"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def instruction_query(attention_mask: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Per row [B] the last instruction token, which PyramidDrop ranks image tokens by: the position just before
    the row's first labelled token (``labels`` [B, T] != -100), or the last real token of ``attention_mask`` [B, T]
    for rows without labels (any padding side)."""
    steps = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # [T]
    last_real = (attention_mask.bool() * steps).amax(-1)  # [B]
    if labels is None:
        return last_real
    labelled = labels != IGNORE_INDEX  # [B, T]
    first = torch.where(labelled, steps, attention_mask.shape[1]).amin(-1)  # [B], T where none
    return torch.where(labelled.any(-1), first - 1, last_real)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``labels[:, t+1]`` from position t, over labels != -100."""
    pred = logits[:, :-1].flatten(0, 1).float()  # [B*(T-1), V]
    target = labels[:, 1:].flatten()  # [B*(T-1)]
    total = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp(min=1)


class VisionLanguageModel(nn.Module):
    """LLaVA-style VLM with Skip-Vision: ``encoder`` [M, N, C_v] -> ``projector`` [M, N, D] -> ``visual``
    (split/merge/summaries, [M, K, D]) -> slots of the ``backbone`` input, whose MLPs skip the S slots."""

    def __init__(
        self,
        encoder: VisionEncoder,
        projector: nn.Module,
        backbone: PreTrainedModel,
        image_token_id: int,
        visual: SkipVisionTokens | None = None,
        skip_layers: list[int] | None = None,
        mask_text_to_skipped: bool = False,
        tiles: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.backbone = backbone
        self.image_token_id = image_token_id
        self.tiles = None if tiles is None else (int(tiles[0]), int(tiles[1]))
        dim = backbone.config.hidden_size
        num_layers = len(decoder_layers(backbone))
        tokens = self.visual_tokens_per_image(encoder, self.tiles)
        self.visual = visual or SkipVisionTokens(tokens, dim, num_layers=num_layers)
        self.skip_ffn = self._skip_ffn(backbone, skip_layers, num_layers)
        self.mask_text_to_skipped = mask_text_to_skipped  # ablation, training only (see run_backbone)
        self._check_drops(num_layers)
        # Distributed runs set this: a batch without images still runs the vision side (see idle_vision).
        self.spmd = False

    @classmethod
    def from_specs(
        cls,
        encoder: Any,
        projector: Any,
        backbone: Any,
        tokenizer: PreTrainedTokenizerBase,
        image_token: str = "<image>",
        skip: Mapping[str, Any] | None = None,
        tiles: Sequence[int] | None = None,
    ) -> VisionLanguageModel:
        """Build every part from registry specs; sizes and the vocabulary are wired from the tokenizer.

        ``tiles`` ([rows, cols]): every image is a thumbnail plus rows x cols high-resolution tiles (LLaVA-HD,
        see skipvision/data/views.py); their tokens are concatenated, the thumbnail's first.

        ``skip``: ``policy``, ``compressor``, ``num_skipped`` (N_s), ``summary_tokens``, ``layers`` (Skip-FFN
        schedule; None = every layer), ``mask_text_to_skipped`` (masking ablation, see :meth:`run_backbone`).
        Omitted: the full model.
        """
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise TokenizerError(
                f"The tokenizer has no {image_token!r} token; add it as a special token (it marks where each image's "
                "tokens go)"
            )
        enc = ENCODERS.build(encoder)
        llm = BACKBONES.build(backbone, vocab_size=len(tokenizer))
        dim = llm.config.hidden_size
        proj = PROJECTORS.build(projector, in_dim=enc.out_dim, out_dim=dim)
        skip = dict(skip or {})
        layers = skip.pop("layers", None)
        mask_text = bool(skip.pop("mask_text_to_skipped", False))
        grid = None if tiles is None else (int(tiles[0]), int(tiles[1]))
        num_tokens = cls.visual_tokens_per_image(enc, grid)
        num_layers = len(decoder_layers(llm))
        visual = SkipVisionTokens(num_tokens=num_tokens, dim=dim, num_layers=num_layers, **skip) if skip else None
        return cls(enc, proj, llm, image_token_id, visual, layers, mask_text, grid)

    @classmethod
    def from_recipe(cls, model_cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> VisionLanguageModel:
        """From a resolved recipe's ``model`` section (plain containers), as training and inference both build it."""
        return cls.from_specs(
            model_cfg["encoder"],
            model_cfg["projector"],
            model_cfg["backbone"],
            tokenizer,
            IMAGE_PLACEHOLDER,
            skip=model_cfg.get("skip"),
            tiles=model_cfg.get("tiles"),
        )

    def _skip_ffn(self, backbone: PreTrainedModel, skip_layers: list[int] | None, num_layers: int) -> SkipFFN | None:
        """Skip-FFN on the layers where the method skips FFN rows: the layout's S slots in ``skip_layers`` (None:
        every layer), and the method's routed layers (whose routing hooks are attached here); None when there are
        neither."""
        routed = self.visual.policy.routed_layers(num_layers)
        if not self.visual.layout.skips and not routed:
            return None
        layers = range(num_layers) if skip_layers is None or not self.visual.layout.skips else skip_layers
        skip = SkipFFN(backbone, [*layers, *routed]).attach()  # checks the recipe's indices, then deduplicates
        if routed:
            self.visual.policy.attach(backbone, skip)
        return skip

    def _check_drops(self, num_layers: int) -> None:
        """Fail at build time, in one line, on drop stages this backbone cannot run, and on the masking ablation
        with drops (its text-to-S mask would not survive the masks rebuilt after a drop)."""
        name = type(self.visual.policy).__name__
        for training in (True, False):
            for stage in self.drop_stages(training):
                if not 1 <= stage.layer < num_layers:
                    raise MethodError(
                        f"{name}: a drop stage's layer (K) must be in [1, {num_layers - 1}] for this "
                        f"{num_layers}-layer backbone, got {stage.layer}"
                    )
        if self.mask_text_to_skipped and self.drop_stages(training=True):
            raise MethodError(
                f"model.skip.mask_text_to_skipped cannot run with {name}'s in-LLM drops in training: the masks "
                "rebuilt after a drop do not carry the text-to-S restriction; turn one off"
            )

    @staticmethod
    def visual_tokens_per_image(encoder: VisionEncoder, tiles: tuple[int, int] | None) -> int:
        """N: the encoder's tokens per view times the views per image (1, or thumbnail + tiles)."""
        return encoder.num_tokens * (1 if tiles is None else 1 + tiles[0] * tiles[1])

    @property
    def num_image_tokens(self) -> int:
        """Slots one ``<image>`` placeholder expands to: N, or N_r + N_s (+ 2 summaries) with Skip-Vision."""
        return self.visual.num_slots

    def drop_stages(self, training: bool) -> tuple[DropStage, ...]:
        """The method's in-LLM drops for this backbone's depth (docs/method.md "Peers"); () for most methods."""
        return self.visual.policy.drop_stages(len(decoder_layers(self.backbone)), training)

    def image_features(self, pixel_values: torch.Tensor) -> VisualTokens:
        """[M, 3, H, W] (or [M, V, 3, H, W] with views) -> the slot tokens [M, K, D] in the LLM's embedding space
        and which slots run the FFN."""
        images = pixel_values.shape[0]
        views = pixel_values.flatten(0, -4)  # [M*V, 3, H, W]
        if isinstance(self.visual.policy, NeedsClsAttention):
            feats, cls_scores = self.encoder.forward_with_cls_attention(views)  # [M*V, n, C], [M*V, n]
        else:
            feats, cls_scores = self.encoder(views), None
        feats = feats.reshape(images, -1, feats.shape[-1])  # [M, N, C], thumbnail view first
        if cls_scores is not None:
            cls_scores = cls_scores.reshape(images, -1)  # [M, N]
        return self.visual(self.projector(feats), cls_scores)  # tokens [M, K, D]

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        num_images: torch.Tensor | None = None,
    ) -> Embedded:
        """Text embeddings with the visual slot tokens written into the image slots, and the Skip-FFN mask.

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
            return Embedded(embeds + self.idle_vision(embeds) if self.spmd else embeds)
        visual = self.image_features(pixel_values)
        tokens = visual.tokens.to(embeds.dtype)  # [M, K, D]
        embeds = embeds.masked_scatter(slots.unsqueeze(-1), tokens.reshape(-1, tokens.shape[-1]))  # [B, T, D]
        ffn_mask = None
        if not bool(visual.ffn.all()):
            ffn_mask = torch.ones_like(slots)  # [B, T]
            ffn_mask[slots] = visual.ffn.repeat(n_images)  # slots fill row-major, image after image
        return Embedded(embeds, ffn_mask, visual.aux_loss, slots)

    def idle_vision(self, like: torch.Tensor) -> torch.Tensor:
        """A zero computed through the encoder, projector and skip tokens (summaries, learned policy) on one blank
        image, in ``like``'s dtype.

        Added to a text-only batch's embeddings when ``spmd`` is set, so the rank still calls every module and
        joins every DDP/FSDP collective its peers with images run (docs/distributed.md "SPMD"), while its outputs and
        loss stay exactly those of the batch alone (x + 0 == x); the vision parameters get zero gradients.
        """
        views = 1 if self.tiles is None else 1 + self.tiles[0] * self.tiles[1]
        dtype = next(self.encoder.parameters()).dtype  # the batches' dtype too: bf16-true casts them, not this
        blank = torch.zeros(1, views, 3, *self.encoder.image_size, device=like.device, dtype=dtype)  # [1, V, 3, H, W]
        visual = self.image_features(blank if self.tiles is not None else blank[:, 0])  # tokens [1, K, D]
        total = visual.tokens.sum() if visual.aux_loss is None else visual.tokens.sum() + visual.aux_loss
        return (total * 0).to(like.dtype)

    def run_backbone(
        self,
        embedded: Embedded,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any = None,
        logits_to_keep: int = 0,
    ) -> Any:
        """The backbone over the full sequence (training and prefill), within
        :func:`~skipvision.skip.in_llm.method_steps`.

        ``logits_to_keep`` 1 computes the LM head at the last position only (prefill); 0 at every position.

        With ``mask_text_to_skipped`` (docs/method.md "Masking ablation", off by default) and in training mode only,
        text tokens do not attend to the skipped slots S, imitating the inference-time removal of their K/V; visual
        slots still attend causally to everything. Eval mode (validation, prefill) keeps the paper's final
        choice: text attends to S.
        """
        if self.training and self.mask_text_to_skipped and embedded.ffn_mask is not None:
            if embedded.visual_slots is None:
                raise ValueError("mask_text_to_skipped needs Embedded.visual_slots (set by embed())")
            attention_mask = text_to_skipped_mask(
                self.backbone.config,
                embedded.embeds,
                attention_mask,
                position_ids,
                embedded.ffn_mask,
                embedded.visual_slots,
                cache,
            )  # [B, 1, T, T] in the attention implementation's format
        return self.backbone(
            inputs_embeds=embedded.embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            logits_to_keep=logits_to_keep,
        )

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
        """Logits [B, T, V] and the loss over ``labels`` [B, T] (-100: none), with the method's steps inside the
        LLM (:func:`~skipvision.skip.in_llm.method_steps`). With in-LLM :meth:`drop_stages` (PyramidDrop; FastV
        only at inference), the backbone drops image slots at the stage boundaries, ranked by each row's last
        instruction token (:func:`instruction_query`); dropped positions' logits are those of a zero hidden state,
        and no labelled prediction is ever dropped."""
        embedded = self.embed(input_ids, pixel_values, num_images)  # embeds [B, T, D]
        positions = positions_from_mask(attention_mask)  # [B, T]
        query = instruction_query(attention_mask, labels)  # [B]
        with method_steps(self, embedded, attention_mask, positions, labels, query):
            out = self.run_backbone(embedded, attention_mask, positions)
        loss = None if labels is None else next_token_loss(out.logits, labels)
        if loss is not None and embedded.aux_loss is not None:
            loss = loss + embedded.aux_loss
        return VLMOutput(logits=out.logits, loss=loss, aux_loss=embedded.aux_loss)
