"""Small byte-level BPE tokenizer trained offline and used as a transformers fast tokenizer.

The synthetic datasets have a tiny vocabulary, so a few hundred BPE tokens cover every word; training
one locally keeps the whole pipeline offline and the language-model embedding table small. Byte-level
BPE means any string is still encodable. ``<image>`` is registered as a special added token so it
always maps to exactly one id (the model later replaces that position with image features).

The tokenizer never adds ``<s>``/``</s>`` by itself: the chat template writes them (skipvision/data/templates.py),
so ``encode`` returns just the text's tokens. :func:`prepare_tokenizer` makes any HF tokenizer usable.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from skipvision.data.templates import AUTO, apply_template
from skipvision.errors import MissingFileError, SkipvisionError


class TokenizerError(SkipvisionError, ValueError):
    """The tokenizer lacks a token the model needs (the image placeholder), or one to pad with."""


SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
IMAGE_TOKEN = "<image>"
# Strings the chat template wraps around conversations; trained on so they get compact encodings.
TEMPLATE_TEXTS = ("USER:", "ASSISTANT:", "\n")
# Effectively unbounded: sequence length is the model's business, not the tokenizer's.
MODEL_MAX_LENGTH = 1_000_000_000


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``, save it to ``out_dir`` and return it.

    Ids 0-4 are ``<pad>``, ``<s>``, ``</s>``, ``<unk>``, ``<image>`` in that order. Occurrences of
    ``<image>`` in ``texts`` are dropped before training so no merges are wasted on its characters.
    """
    specials = [*SPECIAL_TOKENS.values(), IMAGE_TOKEN]
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator((t.replace(IMAGE_TOKEN, "") for t in texts), trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **SPECIAL_TOKENS,
        extra_special_tokens=[IMAGE_TOKEN],
        add_bos_token=False,
        add_eos_token=False,
        padding_side="right",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`train_tokenizer` from a local folder (never touches the network)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise MissingFileError(f"no tokenizer found at {path} (expected {path / 'tokenizer.json'})")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def prepare_tokenizer(
    tokenizer: PreTrainedTokenizerBase, chat_template: str = AUTO, system: str | None = None
) -> PreTrainedTokenizerBase:
    """Make any HF tokenizer usable for training and generation (docs/checkpoints.md "Chat templates"): add
    ``<image>`` as a special token when missing (the backbone grows its embedding table to match), take EOS (else
    UNK) as the pad token when there is none (padding is always masked), and set the chat template
    (skipvision/data/templates.py)."""
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token_id is None:
        fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fallback is None:
            raise TokenizerError("the tokenizer has no pad, EOS or UNK token to pad with")
        tokenizer.pad_token = fallback
    return apply_template(tokenizer, chat_template, system)
