"""The Python inference API, no Lightning needed: load a checkpoint, turn requests into batches, generate.

    from skipvision.inference import Request, VLMGenerator, GenerationConfig
    gen = VLMGenerator.from_checkpoint("runs/shapes-tiny")
    request = Request("What colour is the circle?", image="circle.png")
    [out] = gen.generate([request], GenerationConfig(max_new_tokens=8))
    out.text, out.stats.ttft_ms, out.stats.kv_bytes_prefill, out.stats.kv_bytes_kept

Prompts go through the training chat template (skipvision/data/chat.py), images through the encoder's own
transform (skipvision/data/views.py), so inference sees exactly what training saw. Every request is checked before
anything runs: a missing or unreadable image, an ``<image>`` placeholder count that does not match the images, or a
prompt longer than the model's context fails naming the request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from transformers import PreTrainedTokenizerBase

from skipvision.data.chat import ConversationError, encode_prompt
from skipvision.data.collate import pad_sequences
from skipvision.data.templates import end_of_turn_ids
from skipvision.data.views import image_views
from skipvision.errors import MissingFileError, SkipvisionError
from skipvision.inference.checkpoint import load_model
from skipvision.inference.generate import Generation, PromptTooLongError, check_context, context_limit, generate_tokens
from skipvision.inference.sampling import GenerationConfig
from skipvision.model import VisionLanguageModel


class RequestError(SkipvisionError, ValueError):
    """A request cannot be run (unreadable image, placeholder count, prompt too long); names the request by its
    index in the list given ("request 3: ...", or "request 3 has ..." for a prompt too long)."""


_REQUEST = re.compile(r"request (\d+)(:?) ")


def name_request(err: RequestError, names: Sequence[str]) -> str:
    """``err``'s message with the request it names by index named by ``names[index]`` instead ("request 3: cannot
    read image ..." -> "eval.jsonl:4: cannot read image ...", "request 3 has ..." -> "eval.jsonl:4: the prompt
    has ..."); the message as it is when it names none."""
    found = _REQUEST.match(str(err))
    if found is None or int(found[1]) >= len(names):
        return str(err)
    return f"{names[int(found[1])]}: {'' if found[2] else 'the prompt '}{str(err)[found.end() :]}"


@dataclass
class Request:
    prompt: str  # the user message; ``<image>`` marks where the image goes (prepended when absent)
    image: str | Path | Image.Image | None = None
    system: str | None = None  # this request's system prompt; None: the generator's (its run's data.system_prompt)


@dataclass
class EncodedRequest:
    ids: list[int]
    pixels: torch.Tensor | None  # [3, H, W] or [V, 3, H, W] with HD views


class VLMGenerator:
    """A model, its tokenizer and its image transform, ready to answer requests in batches."""

    def __init__(
        self, model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase, system: str | None = None
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.system = system  # the run's data.system_prompt: prompts render exactly as in training
        self.end_of_turn = end_of_turn_ids(tokenizer)
        self.transform = image_views(model.encoder, model.tiles)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        skip: Mapping[str, Any] | None = None,
    ) -> VLMGenerator:
        """From a run folder, its ``checkpoints/`` folder or a ``.ckpt`` file, or an HF LLaVA folder with an optional
        training-free ``skip`` section (see :mod:`.checkpoint`)."""
        model, tokenizer, recipe = load_model(path, device, dtype, skip)
        return cls(model, tokenizer, None if recipe is None else recipe.data.system_prompt)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, requests: Sequence[Request]) -> list[EncodedRequest]:
        """Tokenise and load every request up front; errors name the request (index from 0)."""
        encoded = []
        for i, req in enumerate(requests):
            try:
                pixels = None if req.image is None else self.transform(_open_image(req.image))
                ids = encode_prompt(
                    self.tokenizer,
                    req.prompt,
                    self.model.num_image_tokens,
                    0 if pixels is None else 1,
                    self.model.image_token_id,
                    self.system if req.system is None else req.system,
                )
            except (ConversationError, FileNotFoundError, ValueError) as err:
                raise RequestError(f"request {i}: {err}") from err
            encoded.append(EncodedRequest(ids, pixels))
        try:
            check_context([len(e.ids) for e in encoded], context_limit(self.model))
        except PromptTooLongError as err:
            raise RequestError(str(err).replace("prompt ", "request ", 1)) from None
        return encoded

    def generate(
        self, requests: Sequence[Request], config: GenerationConfig | None = None, batch_size: int = 8
    ) -> list[Generation]:
        """Answers in request order; requests run ``batch_size`` at a time, left-padded."""
        config = config or GenerationConfig()
        encoded = self.encode(requests)
        results: list[Generation] = []
        for start in range(0, len(encoded), batch_size):
            results += self._generate_batch(encoded[start : start + batch_size], config)
        return results

    def _generate_batch(self, batch: list[EncodedRequest], config: GenerationConfig) -> list[Generation]:
        device = self.device
        ids = pad_sequences([e.ids for e in batch], self.tokenizer.pad_token_id, left=True).to(device)  # [B, P]
        mask = pad_sequences([[1] * len(e.ids) for e in batch], 0, left=True).to(device)  # [B, P]
        images = [e.pixels for e in batch if e.pixels is not None]
        dtype = next(self.model.encoder.parameters()).dtype
        pixels = torch.stack(images).to(device, dtype) if images else None  # [M, 3, H, W] (or [M, V, 3, H, W])
        num_images = torch.tensor([int(e.pixels is not None) for e in batch])  # [B]
        return generate_tokens(self.model, ids, mask, pixels, num_images, config, self.end_of_turn, self.tokenizer)


def _open_image(image: str | Path | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise MissingFileError(f"no image at {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise RequestError(f"cannot read image {path}: {err}") from err
