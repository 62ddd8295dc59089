"""LLaVA-HD views: thumbnail + tiles through the data transform, the model and the paper recipe (meta device)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from skipvision.data.tokenizer import load_tokenizer
from skipvision.data.views import ThumbnailTiles, image_transform
from skipvision.model import VisionLanguageModel
from skipvision.paper import build_meta_model
from skipvision.registry import BACKBONES, ENCODERS

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def test_thumbnail_then_tiles_in_raster_order() -> None:
    image = Image.new("RGB", (8, 8))
    for x in range(8):
        for y in range(8):
            image.putpixel((x, y), (255 if x >= 4 else 0, 255 if y >= 4 else 0, 0))  # quadrant colours
    views = ThumbnailTiles((4, 4), MEAN, STD, (2, 2))(image)
    assert views.shape == (5, 3, 4, 4) and ThumbnailTiles((4, 4), MEAN, STD, (2, 2)).num_views == 5
    torch.testing.assert_close(views[0], image_transform((4, 4), MEAN, STD)(image))
    centre = views[1:, :2, 2, 2]  # [4 tiles, (R, G)] at each tile's centre
    assert centre.round().tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]  # top-left, top-right, bottom-left, ...


def test_model_with_tiles_retains_the_thumbnail(tiny_shapes: Path) -> None:
    torch.manual_seed(0)
    tok = load_tokenizer(tiny_shapes / "tokenizer")
    skip = {"policy": {"name": "prefix", "num_retained": 16}, "num_skipped": 16}
    model = VisionLanguageModel.from_specs(
        ENCODERS.tiny_spec("timm"), "mlp2x_gelu", BACKBONES.tiny_spec("hf_causal_lm"), tok, skip=skip, tiles=[2, 2]
    ).eval()
    assert model.visual.num_tokens == 5 * 16 and model.num_image_tokens == 16 + 1 + 16 + 1
    pixels = torch.randn(2, 5, 3, 32, 32)  # [M, V, 3, H, W]
    with torch.no_grad():
        visual = model.image_features(pixels)
        thumb = model.projector(model.encoder(pixels[:, 0]))  # [M, 16, D]
    assert visual.tokens.shape[:2] == (2, 34)
    torch.testing.assert_close(visual.tokens[:, :16], thumb)  # R is exactly the thumbnail's tokens


def test_paper_hd_recipe_builds_on_meta_with_the_papers_token_counts() -> None:
    model = build_meta_model(
        "paper-llava-hd", ("model.encoder=clip-vit-l-336-config", "model.backbone=llama3-8b-config")
    )
    assert model.tiles == (2, 2) and model.encoder.num_tokens == 576
    assert model.visual.num_tokens == 5 * 576
    assert (model.visual.layout.retained, model.visual.layout.skipped) == (576, 576)
    assert model.num_image_tokens == 576 + 1 + 576 + 1
    assert all(p.device.type == "meta" for p in model.parameters())


def test_cli_fit_with_thumbnail_and_tiles(tiny_overrides: list[str], tmp_path: Path) -> None:
    from .test_fit import _fit

    hd = ["model.tiles=[2,2]", "model.skip.policy={name: prefix, num_retained: 16}", "model.skip.num_skipped=16"]
    assert _fit([*tiny_overrides, *hd]) == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["recipe"]["model"]["tiles"] == [2, 2]
