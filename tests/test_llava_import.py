"""HF LLaVA checkpoints in: a tiny random ``LlavaForConditionalGeneration`` saved by transformers, imported part by part
(vision tower, projector, language model) and compared with transformers' own model (docs/checkpoints.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    SiglipVisionConfig,
)

from skipvision.cli import main
from skipvision.data.chat import encode_prompt
from skipvision.data.collate import pad_sequences
from skipvision.data.tokenizer import IMAGE_TOKEN, load_tokenizer
from skipvision.data.views import image_views, pad_to_square
from skipvision.inference.generate import generate_tokens
from skipvision.inference.generator import Request, VLMGenerator
from skipvision.inference.sampling import GenerationConfig
from skipvision.model import VisionLanguageModel
from skipvision.registry import BACKBONES, PROJECTORS
from skipvision.weights.strict import WeightsMismatchError

PATCHES = 16  # (32 / 8) ** 2


@pytest.fixture(scope="module")
def tokenizer(tiny_shapes: Path):
    return load_tokenizer(tiny_shapes / "tokenizer")


def tiny_llava(tokenizer, vision_config: type = CLIPVisionConfig, **overrides: object) -> LlavaForConditionalGeneration:
    vision = vision_config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        **{"image_seq_length": PATCHES, **overrides},
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def clip_processor() -> CLIPImageProcessor:
    """LLaVA-1.5's image processor at the tiny tower's size: shortest edge to 32, centre crop 32 x 32."""
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture(scope="module")
def llava_folder(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llava")
    tiny_llava(tokenizer).save_pretrained(folder)
    clip_processor().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def imported(folder: Path, tokenizer) -> VisionLanguageModel:
    encoder = {"name": "hf_clip", "path": str(folder)}
    projector = {"name": "mlp2x_gelu", "weights": str(folder)}
    backbone = {"name": "hf_causal_lm", "path": str(folder)}
    return VisionLanguageModel.from_specs(encoder, projector, backbone, tokenizer).eval()


def prompts(tokenizer, model: VisionLanguageModel) -> tuple[torch.Tensor, torch.Tensor]:
    image_id = model.image_token_id
    ids = [
        encode_prompt(tokenizer, "What colour is the circle?", model.num_image_tokens, 1, image_id),
        encode_prompt(tokenizer, "Is there a red square in this picture or not?", model.num_image_tokens, 1, image_id),
    ]
    return pad_sequences(ids, tokenizer.pad_token_id, left=True), pad_sequences(
        [[1] * len(i) for i in ids], 0, left=True
    )


def test_imported_llava_gives_transformers_logits_and_greedy_tokens(llava_folder: Path, tokenizer) -> None:
    ours = imported(llava_folder, tokenizer)
    theirs = LlavaForConditionalGeneration.from_pretrained(llava_folder).eval()
    assert ours.num_image_tokens == PATCHES and ours.encoder.prefix_tokens == 1  # CLS dropped ("default")
    assert len(ours.encoder.blocks()) == 2  # feature layer -2 of 3: the last layer is never run
    ids, mask = prompts(tokenizer, ours)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = ours(ids, mask, pixels, torch.tensor([1, 1])).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    eos = tokenizer.eos_token_id
    generated = generate_tokens(ours, ids, mask, pixels, torch.tensor([1, 1]), GenerationConfig(8), eos)
    with torch.no_grad():
        hf = theirs.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixels,
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )[:, ids.shape[1] :].tolist()
    for row, generation in zip(hf, generated, strict=True):
        assert generation.token_ids == (row[: row.index(eos)] if eos in row else row)


def test_full_selection_keeps_the_cls_token(tokenizer, tmp_path: Path) -> None:
    tiny_llava(tokenizer, vision_feature_select_strategy="full", image_seq_length=PATCHES + 1).save_pretrained(tmp_path)
    model = imported(tmp_path, tokenizer)
    assert model.num_image_tokens == PATCHES + 1 and model.encoder.prefix_tokens == 0 and not model.encoder.has_cls


def test_loading_is_strict_and_names_the_keys(llava_folder: Path, tokenizer, tmp_path: Path) -> None:
    tensors = load_file(llava_folder / "model.safetensors")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((llava_folder / "config.json").read_text())
    del tensors["multi_modal_projector.linear_2.bias"]
    tensors["language_model.model.extra.weight"] = torch.zeros(2)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(
        WeightsMismatchError, match=r"broken \(projector\) does not fit MLPProjector: 1 missing \(2.bias\)"
    ):
        PROJECTORS.build({"name": "mlp2x_gelu", "weights": str(broken)}, in_dim=32, out_dim=64)
    with pytest.raises(WeightsMismatchError, match=r"broken \(language model\) does not fit .*1 unused \(model.extra"):
        BACKBONES.build({"name": "hf_causal_lm", "path": str(broken)})


def test_original_stage1_projector_file_loads_like_the_folder(llava_folder: Path, tmp_path: Path) -> None:
    """The original LLaVA's ``mm_projector.bin`` (keys ``model.mm_projector.0.weight`` ..., a torch file read with
    ``weights_only``) gives the same projector as the HF folder's ``multi_modal_projector``."""
    tensors = load_file(llava_folder / "model.safetensors")
    names = {"linear_1": "0", "linear_2": "2"}
    original = {
        f"model.mm_projector.{names[k.split('.')[1]]}.{k.split('.')[2]}": v
        for k, v in tensors.items()
        if k.startswith("multi_modal_projector.")
    }
    torch.save(original, tmp_path / "mm_projector.bin")
    from_file = PROJECTORS.build(
        {"name": "mlp2x_gelu", "weights": str(tmp_path / "mm_projector.bin")}, in_dim=32, out_dim=64
    )
    from_folder = PROJECTORS.build({"name": "mlp2x_gelu", "weights": str(llava_folder)}, in_dim=32, out_dim=64)
    assert (
        from_file.state_dict().keys() == from_folder.state_dict().keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
    )
    for key, value in from_folder.state_dict().items():
        assert torch.equal(from_file.state_dict()[key], value)


def test_images_go_through_the_checkpoints_processor_and_match_transformers_on_a_non_square_image(
    llava_folder: Path, tokenizer
) -> None:
    """docs/checkpoints.md "Image processing": the folder's own processor (resize the shortest edge, centre crop,
    rescale, normalise), so a non-square image gives transformers' pixel values and logits; LLaVA-1.5's
    pad-to-square fills with the mean colour first."""
    ours = imported(llava_folder, tokenizer)
    theirs = LlavaForConditionalGeneration.from_pretrained(llava_folder).eval()
    transform = image_views(ours.encoder, ours.tiles)
    images = [photo(48, 32, 0), photo(32, 32, 1)]  # non-square (shortest edge 32, cropped), square
    want_pixels = clip_processor()(images=images, return_tensors="pt")["pixel_values"]
    pixels = torch.stack([transform(image) for image in images])
    torch.testing.assert_close(pixels, want_pixels, rtol=0, atol=1e-6)
    ids, mask = prompts(tokenizer, ours)
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask, pixel_values=want_pixels).logits
        got = ours(ids, mask, pixels, torch.tensor([1, 1])).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    padded = VisionLanguageModel.from_specs(
        {"name": "hf_clip", "path": str(llava_folder), "pad_to_square": True},
        {"name": "mlp2x_gelu", "weights": str(llava_folder)},
        {"name": "hf_causal_lm", "path": str(llava_folder)},
        tokenizer,
    )
    fill = tuple(int(m * 255) for m in clip_processor().image_mean)
    square = pad_to_square(images[0], fill)
    assert (
        square.size == (48, 48)
        and square.getpixel((0, 0)) == fill
        and square.getpixel((0, 8)) == images[0].getpixel((0, 0))
    )
    # An independent reference: transformers' LlavaImageProcessor with do_pad (LLaVA-1.5's expand-to-square).
    reference = LlavaImageProcessor(do_pad=True, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.testing.assert_close(
        image_views(padded.encoder, None)(images[0]),
        reference(images=images[0], return_tensors="pt")["pixel_values"][0],
    )


def test_generate_from_a_llava_folder_equals_transformers_generate(
    llava_folder: Path, tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/checkpoints.md "Generating from a LLaVA folder": no training, no run folder; the same tokens as HF
    ``generate`` on the same prompt ids and pixels, through the Python API and the CLI; ``--policy`` runs FastV."""
    image = tmp_path / "photo.png"
    photo(48, 32, 3).save(image)
    generator = VLMGenerator.from_checkpoint(llava_folder)
    request = Request("What colour is the circle?", image)
    (answer,) = generator.generate([request], GenerationConfig(max_new_tokens=6))
    (encoded,) = generator.encode([request])
    theirs = LlavaForConditionalGeneration.from_pretrained(llava_folder).eval()
    ids = torch.tensor([encoded.ids])
    with torch.no_grad():
        hf = theirs.generate(
            input_ids=ids,
            pixel_values=encoded.pixels[None],
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[0, ids.shape[1] :].tolist()
    eos = tokenizer.eos_token_id
    assert answer.token_ids == (hf[: hf.index(eos)] if eos in hf else hf)

    args = ["generate", "--checkpoint", str(llava_folder), "--prompt", request.prompt, "--image", str(image)]
    assert main([*args, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == f"{answer.text}\n"
    assert main([*args, "--policy", "{name: fastv, layer: 1, ratio: 0.5}", "--stats"]) == 0
    assert "KV" in capsys.readouterr().out
    assert main([*args, "--policy", "{name: fastv, layer: 1"]) == 2
    assert "--policy is not valid YAML" in capsys.readouterr().err


def test_transformers_4_key_layout_and_a_siglip_tower(llava_folder: Path, tokenizer, tmp_path: Path) -> None:
    """The published llava-hf folders (saved by transformers 4) nest the tower under ``vision_model.``; a SigLIP
    tower with ``vision_feature_select_strategy: default`` drops its first (patch) token, as transformers does."""
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (old / name).write_text((llava_folder / name).read_text())
    tensors = load_file(llava_folder / "model.safetensors")
    nested = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in tensors.items()}
    save_file(nested, old / "model.safetensors")
    ids, mask = prompts(tokenizer, imported(llava_folder, tokenizer))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = imported(llava_folder, tokenizer)(ids, mask, pixels, torch.tensor([1, 1])).logits
        got = imported(old, tokenizer)(ids, mask, pixels, torch.tensor([1, 1])).logits
    assert torch.equal(got, want)

    siglip = tmp_path / "siglip"
    tiny_llava(tokenizer, SiglipVisionConfig, image_seq_length=PATCHES - 1).save_pretrained(siglip)
    encoder = {"name": "hf_siglip", "path": str(siglip)}
    projector = {"name": "mlp2x_gelu", "weights": str(siglip)}
    ours = VisionLanguageModel.from_specs(encoder, projector, {"name": "hf_causal_lm", "path": str(siglip)}, tokenizer)
    assert ours.num_image_tokens == PATCHES - 1 and not ours.encoder.has_cls
    theirs = LlavaForConditionalGeneration.from_pretrained(siglip).eval()
    ids, mask = prompts(tokenizer, ours)
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = ours.eval()(ids, mask, pixels, torch.tensor([1, 1])).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_policies_that_need_training_are_refused_on_an_untrained_folder(llava_folder: Path, capsys) -> None:
    args = ["generate", "--checkpoint", str(llava_folder), "--prompt", "hi"]
    assert main([*args, "--policy", "{name: attention_score, num_retained: 4}"]) == 2
    assert "needs training" in capsys.readouterr().err


def test_tied_embeddings_load_from_the_one_saved_table(tokenizer, tmp_path: Path) -> None:
    """A LLaVA on an LLM with tied embeddings (small Qwen2/Llama) saves the table once; the LM head shares it."""
    config = tiny_llava(tokenizer).config
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    tied = LlavaForConditionalGeneration(config)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    tied.save_pretrained(tmp_path)
    llm = BACKBONES.build({"name": "hf_causal_lm", "path": str(tmp_path)})
    assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    assert torch.equal(llm.get_input_embeddings().weight, tied.get_input_embeddings().weight)
    assert llm.get_input_embeddings().weight.dtype == torch.float32
