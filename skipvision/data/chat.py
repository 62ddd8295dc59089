"""Chat template and tokenisation with answer-only labels (docs/method.md "Slot layout").

Layout of a conversation (LLaVA-v1 style, one line per turn)::

    <s>USER: <image>\\nWhat colour is the circle?\\nASSISTANT: red</s>\\nUSER: ...

Each ``<image>`` in a user turn is expanded to exactly ``num_image_tokens`` copies of the image token id, the
slots the model fills with visual tokens. Labels are -100 everywhere except the assistant's answer tokens and the
``</s>`` that ends each answer. Training and generation render prompts through the same function, so a prompt at
inference time tokenises exactly like the prefix of a training sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from skipvision.errors import SkipvisionError

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
USER_PREFIX = "USER: "
ASSISTANT_PREFIX = "\nASSISTANT:"
TURN_SEPARATOR = "\n"


class ConversationError(SkipvisionError, ValueError):
    """A conversation is malformed or its ``<image>`` placeholders do not match its images."""


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]
    prompt_length: int  # tokens up to and including the last "ASSISTANT:" (the generation prompt)
    answer: str  # the last assistant turn's text


def _text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def encode_user_turn(
    tokenizer: PreTrainedTokenizerBase, text: str, num_image_tokens: int, image_token_id: int
) -> tuple[list[int], int]:
    """Tokens of ``USER: {text}\\nASSISTANT:`` with each ``<image>`` expanded; returns (ids, images seen)."""
    parts = f"{USER_PREFIX}{text}{ASSISTANT_PREFIX}".split(IMAGE_PLACEHOLDER)
    ids = _text_ids(tokenizer, parts[0])
    for part in parts[1:]:
        ids += [image_token_id] * num_image_tokens + _text_ids(tokenizer, part)
    return ids, len(parts) - 1


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[dict[str, str]],
    num_image_tokens: int,
    num_images: int,
    image_token_id: int,
) -> EncodedConversation:
    """Tokenise alternating human/gpt turns; the placeholder count must equal ``num_images``."""
    if not conversations or len(conversations) % 2:
        raise ConversationError(f"expected alternating human/gpt turns, got {len(conversations)} turns")
    ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
    placeholders, prompt_length, answer = 0, 0, ""
    for i in range(0, len(conversations), 2):
        human, gpt = conversations[i], conversations[i + 1]
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise ConversationError(f"turn {i} must be human then gpt, got {human.get('from')}, {gpt.get('from')}")
        if i:
            sep = _text_ids(tokenizer, TURN_SEPARATOR)
            ids, labels = ids + sep, labels + [IGNORE_INDEX] * len(sep)
        user, seen = encode_user_turn(tokenizer, human["value"], num_image_tokens, image_token_id)
        placeholders += seen
        ids, labels = ids + user, labels + [IGNORE_INDEX] * len(user)
        prompt_length, answer = len(ids), gpt["value"]
        reply = [*_text_ids(tokenizer, f" {answer}"), tokenizer.eos_token_id]
        ids, labels = ids + reply, labels + reply
    if placeholders != num_images:
        raise ConversationError(
            f"conversation has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
            f"but the sample has {num_images} image(s)"
        )
    return EncodedConversation(ids, labels, prompt_length, answer)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, text: str, num_image_tokens: int, num_images: int, image_token_id: int
) -> list[int]:
    """The generation prompt for one user message; the placeholder count must equal ``num_images``.

    A message without ``<image>`` but with one image gets the placeholder prepended, as LLaVA does.
    """
    if num_images == 1 and IMAGE_PLACEHOLDER not in text:
        text = f"{IMAGE_PLACEHOLDER}\n{text}"
    user, seen = encode_user_turn(tokenizer, text, num_image_tokens, image_token_id)
    if seen != num_images:
        raise ConversationError(
            f"prompt has {seen} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s) were given"
        )
    return [tokenizer.bos_token_id, *user]
