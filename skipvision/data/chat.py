"""Conversations -> token ids with answer-only labels, through the tokenizer's chat template (docs/method.md "Slot
layout", docs/checkpoints.md "Chat templates").

A conversation is rendered whole by the chat template (skipvision/data/templates.py) and tokenised once, so
SentencePiece and BPE tokenizers see the text exactly as in one string. Labels are -100 everywhere except each
assistant turn's content and the special token that ends the turn (``</s>``, ``<|im_end|>``, ``<|eot_id|>``), found
from the character offsets of the rendering. Each ``<image>`` is then expanded to exactly ``num_image_tokens``
copies of the image token id, the slots the model fills with visual tokens. A generation prompt is the template's
rendering with ``add_generation_prompt``, which is also the prefix of the training sample ending in that turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from skipvision.data.samples import IMAGE_PLACEHOLDER, turn_order_problem
from skipvision.data.templates import ChatTemplateError, end_of_turn, render
from skipvision.errors import SkipvisionError

IGNORE_INDEX = -100
ROLES = {"human": "user", "gpt": "assistant"}


class ConversationError(SkipvisionError, ValueError):
    """A conversation is malformed or its ``<image>`` placeholders do not match its images."""


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]
    prompt_length: int  # tokens of the generation prompt of the last assistant turn (the training prefix)
    answer: str  # the last assistant turn's text


def _messages(conversations: Sequence[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """LLaVA-style ``{from: human|gpt, value}`` turns -> chat messages; they must alternate, human first and gpt
    last (the rule ``data llava`` checks records by)."""
    problem = turn_order_problem(conversations)
    if problem is not None:
        raise ConversationError(f"expected alternating human/gpt turns, human first and gpt last: {problem}")
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages += [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in conversations]
    return messages


def _tokenise(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    spans: Sequence[tuple[int, int]],
    num_image_tokens: int,
    num_images: int,
    image_token_id: int,
    what: str = "conversation",
) -> tuple[list[int], list[int], list[int]]:
    """Token ids of ``text`` with ``<image>`` expanded, labels (the ids inside ``spans`` of characters, else -100)
    and each token's start character; ``what`` names the text in errors."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels, starts = [], [], []
    for token, (start, _) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        copies = num_image_tokens if token == image_token_id else 1
        inside = any(a <= start < b for a, b in spans) and token != image_token_id
        ids += [token] * copies
        labels += [token if inside else IGNORE_INDEX] * copies
        starts += [start] * copies
    seen = enc["input_ids"].count(image_token_id)
    if seen != num_images:
        raise ConversationError(
            f"{what} has {seen} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s) were given"
        )
    return ids, labels, starts


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[dict[str, str]],
    num_image_tokens: int,
    num_images: int,
    image_token_id: int,
    system: str | None = None,
) -> EncodedConversation:
    """Tokenise alternating human/gpt turns (with an optional system prompt); the placeholder count must equal
    ``num_images``."""
    messages = _messages(conversations, system)
    full = render(tokenizer, messages)
    spans, prompt_chars = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], generation_prompt=True)
        turn_end = len(render(tokenizer, messages[: i + 1]))  # the search never runs into the next turn
        if not full.startswith(prefix):
            raise ChatTemplateError("the chat template renders a conversation's start differently from its whole")
        text = message["content"].strip()  # templates may trim it
        content = full.find(text, len(prefix), turn_end)
        if content < 0:
            raise ChatTemplateError(f"the chat template does not render assistant turn {i} verbatim")
        after = content + len(text)
        closing = end_of_turn(tokenizer, full[after:turn_end])
        if closing is None:
            raise ChatTemplateError(f"the chat template closes assistant turn {i} with no special token")
        spans.append((len(prefix), after + closing))
        prompt_chars = len(prefix)
    if not spans:
        raise ChatTemplateError("the chat template rendered no assistant turn")
    ids, labels, starts = _tokenise(tokenizer, full, spans, num_image_tokens, num_images, image_token_id)
    prompt_length = next(i for i, start in enumerate(starts) if start >= prompt_chars)
    return EncodedConversation(ids, labels, prompt_length, conversations[-1]["value"])


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    num_image_tokens: int,
    num_images: int,
    image_token_id: int,
    system: str | None = None,
) -> list[int]:
    """The generation prompt for one user message; the placeholder count must equal ``num_images``.

    A message without ``<image>`` but with one image gets the placeholder prepended, as LLaVA does.
    """
    if num_images == 1 and IMAGE_PLACEHOLDER not in text:
        text = f"{IMAGE_PLACEHOLDER}\n{text}"
    messages = _messages([{"from": "human", "value": text}, {"from": "gpt", "value": ""}], system)[:-1]
    prompt = render(tokenizer, messages, generation_prompt=True)
    ids, _, _ = _tokenise(tokenizer, prompt, (), num_image_tokens, num_images, image_token_id, "prompt")
    return ids
