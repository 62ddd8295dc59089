"""VisionLanguageModel: parity with the plain HF causal LM, slot filling, per-sample checks, answer-only loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from skipvision.adapters import ADAPTERS
from skipvision.data.chat import IGNORE_INDEX, encode_conversation
from skipvision.data.collate import collate
from skipvision.data.tokenizer import IMAGE_TOKEN, load_tokenizer
from skipvision.model import ImageTokenMismatchError, VisionLanguageModel
from skipvision.registry import ENCODERS

from .families import FAMILIES


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def build(tokenizer, family: str = "llama") -> VisionLanguageModel:
    """The tiny VLM with a supported family's tiny backbone (tests/families.py)."""
    torch.manual_seed(0)
    backbone = {"name": "hf_causal_lm", "config": dict(ADAPTERS[family].tiny_config)}
    return VisionLanguageModel.from_specs(ENCODERS.tiny_spec("timm"), "mlp2x_gelu", backbone, tokenizer).eval()


def make_batch(tokenizer, model: VisionLanguageModel) -> dict:
    """Three samples: one image; two images and a longer prompt; text only."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    convs = [
        (_turns("<image>\nWhat colour is the circle?", "red"), 1),
        (_turns("<image>\n<image>\nHow many shapes are there in both pictures together?", "four"), 2),
        (_turns("Is a square round?", "no"), 0),
    ]
    samples = []
    for i, (conv, n_img) in enumerate(convs):
        enc = encode_conversation(tokenizer, conv, model.num_image_tokens, n_img, image_id)
        images = [torch.randn(3, 32, 32) for _ in range(n_img)]
        samples.append(
            {
                "input_ids": enc.input_ids,
                "labels": enc.labels,
                "images": images,
                "answer": enc.answer,
                "qtype": "x",
                "key": str(i),
            }
        )
    return collate(samples, tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def tokenizer(tiny_shapes: Path):
    return load_tokenizer(tiny_shapes / "tokenizer")


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_plain_hf_model_on_same_embeddings(tokenizer, family: str) -> None:
    model = build(tokenizer, family)
    batch = make_batch(tokenizer, model)
    plain = AutoModelForCausalLM.from_config(model.backbone.config).eval()
    plain.load_state_dict(model.backbone.state_dict())
    with torch.no_grad():
        out = model(
            batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["num_images"], batch["labels"]
        )
        embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["num_images"]).embeds
        ref = plain(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
    real = batch["attention_mask"].bool()
    assert torch.equal(out.logits[real], ref.logits[real])
    torch.testing.assert_close(out.loss, ref.loss)


def test_visual_tokens_fill_exactly_the_slots_in_image_order(tokenizer) -> None:
    model = build(tokenizer)
    batch = make_batch(tokenizer, model)
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["num_images"]).embeds
        feats = model.image_features(batch["pixel_values"]).tokens  # [3, N, D]
        text = model.backbone.get_input_embeddings()(batch["input_ids"])
    slots = batch["input_ids"] == model.image_token_id
    assert slots.sum(-1).tolist() == [16, 32, 0]
    assert torch.equal(embeds[0][slots[0]], feats[0])
    assert torch.equal(embeds[1][slots[1]], feats[1:].flatten(0, 1))
    assert torch.equal(embeds[~slots], text[~slots])


def test_a_sample_in_a_padded_batch_gets_the_same_logits_as_alone(tokenizer) -> None:
    model = build(tokenizer)
    batch = make_batch(tokenizer, model)
    n = int(batch["attention_mask"][0].sum())
    with torch.no_grad():
        together = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["num_images"])
        alone = model(
            batch["input_ids"][:1, :n],
            batch["attention_mask"][:1, :n],
            batch["pixel_values"][:1],
            batch["num_images"][:1],
        )
    torch.testing.assert_close(together.logits[0, :n], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_loss_counts_answer_tokens_only(tokenizer) -> None:
    model = build(tokenizer)
    batch = make_batch(tokenizer, model)
    labelled = (batch["labels"] != IGNORE_INDEX).sum(-1).tolist()
    answers = [len(tokenizer.encode(f" {a}", add_special_tokens=False)) + 1 for a in ("red", "four", "no")]
    assert labelled == answers  # answer tokens + </s>, nothing from prompt, image or padding
    with torch.no_grad():
        out = model(
            batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["num_images"], batch["labels"]
        )
        logp = out.logits[:, :-1].log_softmax(-1)
        target = batch["labels"][:, 1:]
        keep = target != IGNORE_INDEX
        manual = -logp[keep].gather(-1, target[keep][:, None]).mean()
    torch.testing.assert_close(out.loss, manual)


def test_mismatched_slots_name_the_sample(tokenizer) -> None:
    model = build(tokenizer)
    batch = make_batch(tokenizer, model)
    wrong = torch.tensor([2, 1, 0])  # total still 3 images, but samples 0 and 1 disagree with their slots
    with pytest.raises(ImageTokenMismatchError, match=r"sample 0 has 16 image-token slots but 2 image\(s\) x 16"):
        model.embed(batch["input_ids"], batch["pixel_values"], wrong)
    with pytest.raises(ImageTokenMismatchError, match="num_images sums to 3 but 2 images"):
        model.embed(batch["input_ids"], batch["pixel_values"][:2], batch["num_images"])
    one = batch["input_ids"][:1]
    with pytest.raises(ImageTokenMismatchError, match="16 image-token slots but 2 image"):
        model.embed(one, batch["pixel_values"][:2])
