"""The lmms-eval model ``skipvision`` (docs/evaluation.md "lmms-eval").

    lmms-eval --model skipvision --model_args checkpoint=runs/shapes-tiny --tasks TASK --batch_size 8

lmms-eval finds it through the entry-point group ``lmms_eval.models`` (pyproject.toml), whose entry point is
:func:`skipvision.integrations.lmms_eval_manifest`. Answers come from :meth:`VLMGenerator.generate
<skipvision.inference.VLMGenerator.generate>`, so decoding runs the KV-removal loop, and each prompt is built as
``skipvision eval`` builds it (:func:`skipvision.eval.runner.eval_request`): the task's text as the user message, the
document's image as the request's image. On the same data and settings both commands give the same answers.
Requests run in lmms-eval's order, ``batch_size`` at a time (images are opened one batch at a time), grouped by their
generation settings.

Only ``generate_until`` is implemented: scoring answers by likelihood (``loglikelihood``) and multi-round dialogue
fail with an error that names the alternative. One process evaluates every document: several processes
(``accelerate launch``, ``torchrun``: ``WORLD_SIZE`` above 1) are refused, since the model does not take part in
lmms-eval's multi-process evaluation (it has no ``accelerator`` to synchronise with).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.utils import simple_parse_args_string
from PIL import Image
from tqdm import tqdm

from skipvision.errors import SkipvisionError
from skipvision.eval.cli import check_models
from skipvision.eval.runner import ModelSpec
from skipvision.inference.cli import DTYPES, policy_spec
from skipvision.inference.generator import Request, RequestError, VLMGenerator, name_request
from skipvision.inference.sampling import GenerationConfig

# lmms-eval's own models' budget for a task whose generation_kwargs set no max_new_tokens.
DEFAULT_MAX_NEW_TOKENS = 1024
CLI_SETTINGS = ("batch_size", "device")  # what lmms-eval's --batch_size and --device pass, unless model_args do
# The values of a boolean model argument: lmms-eval turns "true"/"false" into bools and "1"/"0" into ints.
BOOLEANS = {"true": True, "false": False, "1": True, "0": False}


class LmmsEvalError(SkipvisionError, ValueError):
    """A model argument, generation setting or document the adapter cannot run; the message names it."""


class SkipVisionLMM(lmms):
    """A skipvision checkpoint answering lmms-eval's ``generate_until`` requests.

    ``checkpoint``: a run folder, its ``checkpoints/`` folder, a ``.ckpt``, an export folder or an HF LLaVA folder;
    ``policy``: for an HF LLaVA folder, a training-free skip policy as ``skipvision generate --policy`` takes it
    (``fastv`` or ``{name: fastv, layer: 2}``); ``max_new_tokens``: replaces every task's budget; ``drop_kv=false``
    keeps the skipped tokens' K/V after prefill (docs/method.md "KV removal").
    """

    is_simple = True

    def __init__(
        self,
        checkpoint: str,
        policy: str | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str = "float32",
        max_new_tokens: int | None = None,
        drop_kv: bool | int | str = True,
    ) -> None:
        super().__init__()
        processes = _processes()
        if processes > 1:
            raise LmmsEvalError(
                f"{processes} processes (WORLD_SIZE): the skipvision model runs in one process, it does not take "
                "part in multi-process evaluation; run lmms-eval without accelerate launch or torchrun"
            )
        if dtype not in DTYPES:
            raise LmmsEvalError(f"model_args dtype={dtype}: expected one of {', '.join(DTYPES)}")
        self.batch_size = _positive("batch_size", batch_size)
        self.max_new_tokens = None if max_new_tokens is None else _positive("max_new_tokens", max_new_tokens)
        self.drop_kv = _boolean("drop_kv", drop_kv)
        self.spec = ModelSpec("skipvision", str(checkpoint), None if policy is None else policy_spec(str(policy)))
        check_models([self.spec])  # a missing checkpoint or a policy on a trained run: the eval command's one line
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.generator = VLMGenerator.from_checkpoint(
            self.spec.checkpoint, device, getattr(torch, dtype), self.spec.skip
        )

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: Mapping[str, Any] | None = None
    ) -> SkipVisionLMM:
        """``--model_args`` as keyword arguments; ``batch_size`` and ``device`` there win over lmms-eval's
        ``--batch_size`` and ``--device`` (which lmms-eval always passes: ``--batch_size`` defaults to 1)."""
        args = simple_parse_args_string(arg_string)
        cli = {k: v for k, v in (additional_config or {}).items() if k in CLI_SETTINGS and v is not None}
        return cls(**{**cli, **args})

    def generate_until(self, requests: Sequence[Instance]) -> list[str]:
        """The answer of every request, in order; the text stops before the first of the task's ``until``."""
        configs = [self.generation_config(r.args[1]) for r in requests]
        groups: dict[str, list[int]] = {}  # the same settings in one batch; each group keeps lmms-eval's order
        for index, config in enumerate(configs):
            groups.setdefault(repr(config), []).append(index)
        answers = [""] * len(requests)
        with tqdm(total=len(requests), desc="Model Responding", disable=self.rank != 0) as bar:
            for indices in groups.values():
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start : start + self.batch_size]
                    texts = self._answer([requests[i] for i in batch], configs[batch[0]])
                    for index, text in zip(batch, texts, strict=True):
                        answers[index] = text
                    bar.update(len(batch))
        return answers

    def generation_config(self, gen_kwargs: Mapping[str, Any]) -> GenerationConfig:
        """A task's ``generation_kwargs`` as ours: ``until`` (stop strings), ``max_new_tokens``, ``temperature``
        (0: greedy, as lmms-eval's own models decide ``do_sample``) and ``top_p``; beam search is refused and the
        other keys are not read."""
        if int(gen_kwargs.get("num_beams") or 1) > 1:
            raise LmmsEvalError("generation_kwargs num_beams > 1: beam search is not supported (greedy or sampling)")
        until = gen_kwargs.get("until") or ()
        stop = tuple(s for s in ([until] if isinstance(until, str) else until) if s)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        top_p = gen_kwargs.get("top_p") if temperature > 0 else None
        budget = self.max_new_tokens or int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        return GenerationConfig(budget, temperature, top_p=top_p, stop=stop, drop_kv=self.drop_kv)

    def _answer(self, batch: list[Instance], config: GenerationConfig) -> list[str]:
        requests = [self._request(instance) for instance in batch]
        try:
            generations = self.generator.generate(requests, config, self.batch_size)
        except RequestError as err:
            names = [f"task {instance.task_name} doc {instance.doc_id}" for instance in batch]
            raise LmmsEvalError(name_request(err, names)) from None
        texts = [g.text or "" for g in generations]
        for instance, text in zip(batch, texts, strict=True):
            self.cache_hook.add_partial("generate_until", instance.args[:2], text)
        return texts

    def _request(self, instance: Instance) -> Request:
        """The document's text and its one image (or none), as ``skipvision eval`` sends an item."""
        context, _, doc_to_visual, doc_id, task, split = instance.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        visuals = visuals if isinstance(visuals, list) else [visuals]
        if len(visuals) > 1 or any(not isinstance(v, Image.Image) for v in visuals):
            kinds = ", ".join(type(v).__name__ for v in visuals)
            raise LmmsEvalError(
                f"task {task} doc {doc_id}: skipvision answers with at most one image per question, got {kinds}"
            )
        return Request(context, visuals[0] if visuals else None)

    def loglikelihood(self, requests: Sequence[Instance]) -> list[tuple[float, bool]]:
        raise LmmsEvalError(
            "skipvision implements generate_until only; loglikelihood (scoring choices by likelihood) is not "
            "supported: use the task's generation variant"
        )

    def generate_until_multi_round(self, requests: Sequence[Instance]) -> list[str]:
        raise LmmsEvalError("skipvision implements generate_until only; multi-round tasks are not supported")


def _positive(name: str, value: int | str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise LmmsEvalError(f"model_args {name}={value}: expected a whole number of at least 1")
    return number


def _processes() -> int:
    """How many processes this one runs among: ``WORLD_SIZE``, which ``accelerate launch`` and ``torchrun`` set
    (lmms-eval's Accelerator reads it too), or an initialised process group's size."""
    try:
        processes = int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        processes = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        processes = max(processes, torch.distributed.get_world_size())
    return processes


def _boolean(name: str, value: bool | int | str) -> bool:
    """A boolean model argument: a bool, or true/false/1/0 in any case (``bool("no")`` would be True)."""
    if isinstance(value, bool):
        return value
    found = BOOLEANS.get(str(value).strip().lower())
    if found is None:
        raise LmmsEvalError(f"model_args {name}={value}: expected true or false (or 1 or 0)")
    return found
