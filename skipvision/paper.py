"""The paper's settings at full size: token counts, meta-device builds and LLM prefill FLOPs next to the paper's.

The token pipeline is docs/method.md "Token pipeline", the FLOP model docs/method.md "Costs". Here every setting
with a recipe (``recipes/paper-llava.yaml``, ``recipes/paper-llava15-7b.yaml``, ``recipes/paper-llava-hd.yaml``:
thumbnail + 2 x 2 tiles) is built for real from that recipe,
on the meta device (shapes only: no weights, no memory, no download), with the checkpoint specs swapped for the
same-shape config presets (``clip-vit-l-336-config``, ``llama3-8b-config``, ``vicuna-7b-config``). Its token
schedule is derived from the built model (:func:`skipvision.costs.model_schedule`) and the LLM's dimensions are read
off the built backbone's config. Settings without a recipe (Chain-of-Sight) take the paper's token counts (see
:data:`SETTINGS`, :func:`skipvision.costs.counts_schedule`) and the LLaMA3-8B shape from its config preset:
"analytic from token counts", nothing is built.

FLOPs of one sample's prefill, analytic with :mod:`skipvision.costs` (matmuls only): ``text_tokens`` prompt tokens
plus one image's slots; the full model has N visual tokens and runs the FFN on every token, Skip-Vision has N_r +
N_s + 2 slots and runs the FFN on all but the N_s skipped ones. Logits are computed for the last token only (the
prefill's output is the first answer token), and the attention-score term counts the full T x T square as fused
kernels do (``causal=True``: only the causal half). The vision encoder and projector run the same in both models;
:func:`vision_flops` measures them on the meta device with FlopCounterMode, one image (all its views).

Against the paper (``python -m skipvision flops``, 40 text tokens): LLaVA 27.8% vs the paper's 25%, Chain-of-Sight
26.8% vs 25%, LLaVA-HD 24.1% vs 50%. The share depends on the prompt length (the text runs the FFN in both models):
the LLaVA setting gives 23.0% with 1 text token and 25% near 16; the paper states neither its text length nor
whether the vision encoder is counted (with it, 30.9% at 40 text tokens). LLaVA-HD does not reproduce: with all
2880 tokens at full compute as the baseline, token counts alone give about 24%, so the paper's 50% must rest on
another baseline or accounting, which we have not identified.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from rich import box
from rich.table import Table
from transformers import AutoConfig, PreTrainedTokenizerFast

from skipvision.costs import TokenSchedule, counts_schedule, model_schedule, prefill_flops
from skipvision.data.tokenizer import train_tokenizer
from skipvision.flops import LLMShape, measured_flops
from skipvision.model import VisionLanguageModel
from skipvision.recipe import load_recipe
from skipvision.registry import import_modules, load_preset

DEFAULT_TEXT_TOKENS = 40
"""Prompt text tokens per sample (system prompt, question and chat template), besides the image slots."""

ANALYTIC = "analytic from token counts"


def describe_slots(tokens: int, retained: int, skipped: int, summaries: int = 2) -> str:
    """``576 -> 258 (100R + 156S + 2)``: one image's N visual tokens -> its slots (retained + skipped + summaries)."""
    return f"{tokens} -> {retained + skipped + summaries} ({retained}R + {skipped}S + {summaries})"


@dataclass(frozen=True)
class PaperSetting:
    """One of the paper's settings: built from a recipe on the meta device, or analytic from its token counts."""

    key: str
    title: str
    paper_share: float | None  # the paper's inference FLOPs, Skip-Vision / full model
    recipe: str | None = None  # a recipe name under recipes/ (built on the meta device)
    meta_overrides: tuple[str, ...] = ()  # same-shape config presets in place of the recipe's checkpoints
    counts: tuple[int, int, int] | None = None  # N, N_r, N_s of a setting without a recipe (2 summaries)
    backbone_preset: str = "llama3-8b-config"  # LLM shape of a setting without a recipe

    def __post_init__(self) -> None:
        if (self.recipe is None) == (self.counts is None):
            raise ValueError(f"setting {self.key!r}: give exactly one of recipe or counts")


_CLIP_L = "model.encoder=clip-vit-l-336-config"

SETTINGS: tuple[PaperSetting, ...] = (
    PaperSetting(
        "llava",
        "LLaVA (LLaMA3-8B)",
        0.25,
        recipe="paper-llava",
        meta_overrides=(_CLIP_L, "model.backbone=llama3-8b-config"),
    ),
    PaperSetting(
        "llava15-7b",
        "LLaVA-1.5-7B (Vicuna-7B)",
        None,
        recipe="paper-llava15-7b",
        meta_overrides=(_CLIP_L, "model.backbone=vicuna-7b-config"),
    ),
    # Thumbnail view (576 tokens) retained; the 4 high-resolution tiles (4 x 576 = 2304 tokens) merged to 576.
    PaperSetting(
        "llava-hd",
        "LLaVA-HD (LLaMA3-8B)",
        0.50,
        recipe="paper-llava-hd",
        meta_overrides=(_CLIP_L, "model.backbone=llama3-8b-config"),
    ),
    # Coarse multi-scale tokens (272) retained; the finest scale (1024 tokens) merged to 256.
    PaperSetting("cos", "Chain-of-Sight (LLaMA3-8B)", 0.25, counts=(272 + 1024, 272, 256)),
)


def get_setting(key: str) -> PaperSetting:
    """The setting of :data:`SETTINGS` with this ``key``."""
    for setting in SETTINGS:
        if setting.key == key:
            return setting
    raise KeyError(f"unknown paper setting {key!r}; settings: {', '.join(s.key for s in SETTINGS)}")


@functools.cache
def counting_tokenizer() -> PreTrainedTokenizerFast:
    """A small real tokenizer with ``<image>`` for meta-device builds; the backbone configs' own vocabulary wins
    (``hf_causal_lm`` only fills a missing ``vocab_size`` and never shrinks a table)."""
    with tempfile.TemporaryDirectory() as tmp:
        return train_tokenizer(["USER: what is in the image?", "ASSISTANT: a red circle."], tmp, vocab_size=300)


def build_meta_model(recipe: str, overrides: Sequence[str] = ()) -> VisionLanguageModel:
    """Build a recipe's VLM on the meta device: every parameter and buffer is a shape without storage.

    The recipe's specs must be buildable without weights (``config:`` dicts, not ``path:``): pass same-shape
    config presets in ``overrides`` (see :data:`SETTINGS`).
    """
    cfg = load_recipe(recipe, list(overrides))
    import_modules(list(cfg.imports))
    tokenizer = counting_tokenizer()
    with torch.device("meta"):
        return VisionLanguageModel.from_recipe(OmegaConf.to_container(cfg.model, resolve=True), tokenizer)


@torch.no_grad()
def vision_flops(model: VisionLanguageModel) -> int:
    """Encoder + projector FLOPs of one image (all its views), measured with FlopCounterMode on the (meta)
    model's own device."""
    device = next(model.encoder.parameters()).device
    views = 1 if model.tiles is None else 1 + model.tiles[0] * model.tiles[1]
    pixels = torch.zeros(views, 3, *model.encoder.image_size, device=device)  # [V, 3, H, W]
    return measured_flops(lambda: model.projector(model.encoder(pixels)))


@dataclass(frozen=True)
class FlopsRow:
    """One setting's prefill FLOPs, full model vs Skip-Vision, next to the paper's share."""

    setting: PaperSetting
    slots: str  # one image's visual tokens -> slots, as :func:`describe_slots` writes them
    shape: LLMShape
    text_tokens: int
    full_flops: int
    skip_flops: int
    vision_flops: int | None  # encoder + projector per image (same in both); None when nothing was built
    source: str  # where the token counts and LLM shape come from
    causal: bool = False  # attention scores: only the causal half of the T x T square

    @property
    def built(self) -> bool:
        """Whether the numbers come from a model built on the meta device (else: analytic from token counts)."""
        return self.setting.recipe is not None

    @property
    def share(self) -> float:
        """Skip-Vision's LLM prefill FLOPs as a fraction of the full model's."""
        return self.skip_flops / self.full_flops


def setting_flops(setting: PaperSetting, text_tokens: int = DEFAULT_TEXT_TOKENS, causal: bool = False) -> FlopsRow:
    """Prefill FLOPs of one setting: built on the meta device from its recipe, or analytic from its token counts."""
    if text_tokens < 0:
        raise ValueError(f"text_tokens must be >= 0, got {text_tokens}")
    vision = None
    if setting.recipe is not None:
        model = build_meta_model(setting.recipe, setting.meta_overrides)
        visual, shape = model.visual, LLMShape.from_config(model.backbone.config)
        num_tokens = visual.num_tokens
        layout = visual.layout
        slots = describe_slots(num_tokens, layout.retained, layout.skipped, layout.summaries)
        skip = model_schedule(model, text_tokens)
        vision = vision_flops(model)
        source = f"recipes/{setting.recipe}.yaml built on the meta device"
    else:
        assert setting.counts is not None
        config = dict(load_preset("backbone", setting.backbone_preset)["config"])
        shape = LLMShape.from_config(AutoConfig.for_model(**config))
        num_tokens, retained, skipped = setting.counts
        slots = describe_slots(num_tokens, retained, skipped)
        skip = counts_schedule(shape.layers, text_tokens, num_tokens, retained, skipped)
        source = f"{ANALYTIC} ({setting.backbone_preset})"
    full = TokenSchedule.full(shape.layers, text_tokens, num_tokens)
    full_flops, skip_flops = prefill_flops(shape, full, causal), prefill_flops(shape, skip, causal)
    return FlopsRow(setting, slots, shape, text_tokens, full_flops, skip_flops, vision, source, causal)


def paper_flops(text_tokens: int = DEFAULT_TEXT_TOKENS, causal: bool = False) -> list[FlopsRow]:
    """:func:`setting_flops` for every setting in :data:`SETTINGS`."""
    return [setting_flops(s, text_tokens, causal) for s in SETTINGS]


def flops_table(rows: Sequence[FlopsRow]) -> Table:
    """A rich table of :func:`paper_flops` rows (``python -m skipvision flops``)."""
    text = {r.text_tokens for r in rows}
    scores = "the causal half of T x T" if all(r.causal for r in rows) else "the full T x T square"
    table = Table(
        title=f"LLM prefill FLOPs of one sample ({'/'.join(map(str, sorted(text)))} text tokens + 1 image)",
        title_justify="left",
        caption="LLM: analytic matmul FLOPs (skipvision.flops), logits for the last token only, attention scores "
        f"over {scores}. Slots: R retained + S skipped (attention only, no FFN) + summary tokens. paper: the "
        "paper's inference FLOPs share (docs/method.md \"Costs\"). vision: encoder + projector per image "
        "(FlopCounterMode), the same in both models. Settings built from their recipes on the meta device, except "
        f"* {ANALYTIC} (the paper's counts, LLaMA3-8B shape).",
        caption_justify="left",
        box=box.SIMPLE_HEAVY,
        pad_edge=False,
    )
    table.add_column("setting", min_width=14)
    table.add_column("visual tokens\n-> slots", min_width=11)
    for header in ("full\nTFLOPs", "Skip\nTFLOPs", "share", "paper", "vision\nTFLOPs"):
        table.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(
            r.setting.title if r.built else f"{r.setting.title} *",
            r.slots,
            f"{r.full_flops / 1e12:.2f}",
            f"{r.skip_flops / 1e12:.2f}",
            f"{r.share:.1%}",
            "-" if r.setting.paper_share is None else f"{r.setting.paper_share:.0%}",
            "-" if r.vision_flops is None else f"{r.vision_flops / 1e12:.3f}",
        )
    return table
