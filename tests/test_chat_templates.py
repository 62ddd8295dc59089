"""Real chat templates (docs/checkpoints.md "Chat templates"): ChatML (Qwen2), Llama-3 and Vicuna / LLaVA-v1 style
tokenizers built offline, their templates as those families ship them (trimmed to what the tests use).

For multi-turn conversations with images: the supervised positions decode to exactly each answer plus its
end-of-turn token, the generation prompt is the template's ``add_generation_prompt`` rendering (and the prefix of the
training sample), and generation stops on the template's end-of-turn id.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import AddedToken, SentencePieceBPETokenizer
from transformers import PreTrainedTokenizerFast

from skipvision.data.chat import IGNORE_INDEX, encode_conversation, encode_prompt
from skipvision.data.templates import ChatTemplateError, apply_template, end_of_turn_ids, render
from skipvision.data.tokenizer import IMAGE_TOKEN, prepare_tokenizer, train_tokenizer

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
TEXTS = ["What colour is the circle in the picture?", "It is red.", "And the square?", "The square is blue."]
N = 3  # image slots per <image>


def chatml(folder: Path) -> PreTrainedTokenizerFast:
    """Qwen2-like: byte-level BPE, ``<|im_start|>``/``<|im_end|>``, no BOS, EOS ``<|im_end|>``, pad
    ``<|endoftext|>``."""
    base = train_tokenizer(TEXTS * 3, folder, vocab_size=300)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")], True)
    tok.chat_template = CHATML
    return tok


def llama3(folder: Path) -> PreTrainedTokenizerFast:
    """Llama-3-like: ``<|begin_of_text|>`` BOS, ``<|eot_id|>`` ends turns, no pad token."""
    base = train_tokenizer(TEXTS * 3, folder, vocab_size=300)
    specials = ("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, bos_token=specials[0], eos_token=specials[1])
    tok.add_tokens([AddedToken(t, special=True) for t in specials], True)
    tok.pad_token = None
    tok.chat_template = LLAMA3
    return tok


def vicuna() -> PreTrainedTokenizerFast:
    """Vicuna-like: SentencePiece BPE (``▁`` pieces), ``<s>``/``</s>``, no pad, no chat template, no ``<image>``."""
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(TEXTS * 3, vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(params=["chatml", "llama3", "vicuna"])
def tokenizer(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, PreTrainedTokenizerFast, str]:
    """(kind, tokenizer ready for skipvision, its end-of-turn token)."""
    kind = request.param
    if kind == "chatml":
        tok, eot = prepare_tokenizer(chatml(tmp_path)), "<|im_end|>"
    elif kind == "llama3":
        tok, eot = prepare_tokenizer(llama3(tmp_path)), "<|eot_id|>"
    else:
        tok, eot = prepare_tokenizer(vicuna(), "llava_v1"), "</s>"
    return kind, tok, eot


def conversation() -> list[dict[str, str]]:
    return [
        {"from": "human", "value": f"{IMAGE_TOKEN}\n{TEXTS[0]}"},
        {"from": "gpt", "value": TEXTS[1]},
        {"from": "human", "value": TEXTS[2]},
        {"from": "gpt", "value": TEXTS[3]},
    ]


def supervised_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        if not runs or labels[i - 1] == IGNORE_INDEX:
            runs.append([])
        runs[-1].append(ids[i])
    return runs


def test_labels_cover_each_answer_and_its_end_of_turn_exactly(tokenizer) -> None:
    _, tok, eot = tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    enc = encode_conversation(tok, conversation(), N, 1, image_id)
    assert enc.input_ids.count(image_id) == N and all(
        label == IGNORE_INDEX for i, label in zip(enc.input_ids, enc.labels, strict=True) if i == image_id
    )
    runs = supervised_runs(enc.input_ids, enc.labels)
    assert [tok.decode(run).strip() for run in runs] == [TEXTS[1] + eot, TEXTS[3] + eot]
    assert enc.answer == TEXTS[3]
    assert tok.pad_token_id is not None  # Llama-3 and Vicuna had none


def test_generation_prompt_is_the_templates_and_the_training_prefix(tokenizer) -> None:
    kind, tok, _ = tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    prompt = encode_prompt(tok, TEXTS[0], 1, 1, image_id)  # one slot per image: the ids are the template's own
    messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{TEXTS[0]}"}]
    rendering = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendering == render(tok, messages, generation_prompt=True)
    assert prompt == tok(rendering, add_special_tokens=False)["input_ids"]
    first_turn = encode_conversation(tok, conversation()[:2], 1, 1, image_id)
    assert prompt == first_turn.input_ids[: first_turn.prompt_length]
    if kind == "llama3":
        assert prompt[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
    if kind == "chatml":
        assert tok.bos_token_id is None and "<|im_start|>system" in rendering


def test_generation_stops_on_the_templates_end_of_turn(tokenizer) -> None:
    _, tok, eot = tokenizer
    ids = end_of_turn_ids(tok)
    assert tok.convert_tokens_to_ids(eot) in ids and tok.eos_token_id in ids


def test_system_prompt_and_template_choices() -> None:
    tok = prepare_tokenizer(vicuna(), "llava_v1")
    messages = [{"role": "user", "content": "hi"}]
    assert render(tok, messages, generation_prompt=True).startswith("<s>A chat between a curious human")
    system = render(tok, [{"role": "system", "content": "Be brief."}, *messages], generation_prompt=True)
    assert system == "<s>Be brief. USER: hi ASSISTANT:"
    with pytest.raises(ChatTemplateError, match=r"'data.chat_template' is 'vicuna'; valid values: auto, tokenizer, "):
        apply_template(vicuna(), "vicuna")
    with pytest.raises(ChatTemplateError, match="the tokenizer has no chat template"):
        apply_template(vicuna(), "tokenizer")


def test_fallback_layouts_render_exactly() -> None:
    tok = prepare_tokenizer(vicuna(), "skipvision_v1")
    turns = [
        {"role": "user", "content": "<image>\nQ1?"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2?"},
        {"role": "assistant", "content": "A2"},
    ]
    assert render(tok, turns) == "<s>USER: <image>\nQ1?\nASSISTANT: A1</s>\nUSER: Q2?\nASSISTANT: A2</s>"
    with_system = [{"role": "system", "content": "Be brief."}, *turns[:1]]
    assert render(tok, with_system, generation_prompt=True) == "<s>Be brief.\nUSER: <image>\nQ1?\nASSISTANT:"
    apply_template(tok, "llava_v1")
    assert render(tok, turns).endswith(" USER: <image>\nQ1? ASSISTANT: A1</s>USER: Q2? ASSISTANT: A2</s>")


def test_an_end_of_turn_other_than_eos_is_found(tmp_path: Path) -> None:
    """Qwen2 base-style: EOS ``<|endoftext|>``, turns closed by ``<|im_end|>``: generation stops on both, labels end
    with ``<|im_end|>``."""
    tok = chatml(tmp_path)
    tok.eos_token = "<|endoftext|>"
    tok = prepare_tokenizer(tok)
    ids = end_of_turn_ids(tok)
    assert ids == sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")})
    assert len(ids) == 2
    enc = encode_conversation(tok, conversation(), N, 1, tok.convert_tokens_to_ids(IMAGE_TOKEN))
    assert tok.decode(supervised_runs(enc.input_ids, enc.labels)[0]) == TEXTS[1] + "<|im_end|>"
