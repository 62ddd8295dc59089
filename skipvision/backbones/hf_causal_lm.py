"""An HF causal LM of a supported family as the backbone, built from a config dict or loaded from a local folder.

The model is an unmodified transformers model: Skip-FFN (docs/method.md "The Skip-FFN layer") attaches to it from
outside, so checkpoints stay HF-loadable. The family must have a decoder adapter (docs/adapters.md); any other
``model_type`` fails here, at build time, in one line naming the supported ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from skipvision.adapters import adapter_for
from skipvision.registry import BACKBONES
from skipvision.skeleton import building_skeleton
from skipvision.weights.llava import llava_config, read_part
from skipvision.weights.strict import WeightsMismatchError, load_strict

TINY_LLAMA = {
    "config": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    }
}


@BACKBONES.register("hf_causal_lm", tiny=TINY_LLAMA)
def hf_causal_lm(
    config: dict[str, Any] | None = None,
    path: str | None = None,
    attn_implementation: str | None = None,
    vocab_size: int | None = None,
) -> PreTrainedModel:
    """Build ``AutoModelForCausalLM`` from ``config`` (needs ``model_type``) or load it from ``path``: an HF causal
    LM folder, or an HF LLaVA folder whose language model is taken (docs/checkpoints.md "LLaVA folders"). Loading
    is strict: weights the model needs but the folder lacks are an error, never a random initialisation.

    ``vocab_size`` is wired by the framework from the tokenizer: a config without one takes it, and a loaded
    model whose embedding table is smaller than the tokenizer is resized, new rows set to the mean of the old.
    ``attn_implementation`` None takes transformers' default for the family (sdpa where it has one; Gemma 2 eager).
    """
    if (config is None) == (path is None):
        raise ValueError("hf_causal_lm: give exactly one of 'config' (a dict with model_type) or 'path'")
    if path is not None and llava_config(path) is not None:
        model = _llava_language_model(path, attn_implementation)
    elif path is not None:
        if Path(path).exists() and not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"No config.json in backbone folder {path}")
        saved = AutoConfig.from_pretrained(path)
        adapter_for(saved)  # an unsupported family fails before any weight is read
        if building_skeleton():  # the architecture only; FSDP fills in the weights (skipvision/skeleton.py)
            model = AutoModelForCausalLM.from_config(
                saved, attn_implementation=attn_implementation, dtype=torch.float32
            )
        else:  # fp32 parameters (the recipe's precision decides the compute dtype), whatever dtype the folder has
            model, info = AutoModelForCausalLM.from_pretrained(
                path, attn_implementation=attn_implementation, output_loading_info=True, dtype=torch.float32
            )
            if info["missing_keys"]:  # transformers would leave them randomly initialised
                missing = sorted(info["missing_keys"])
                raise WeightsMismatchError(
                    f"{path} does not fit {type(model).__name__}: {len(missing)} missing ({', '.join(missing[:5])})"
                )
    else:
        config = dict(config)
        if "model_type" not in config:
            raise ValueError("hf_causal_lm: 'config' needs a 'model_type' (e.g. llama, qwen2, mistral)")
        if vocab_size is not None:
            config.setdefault("vocab_size", vocab_size)
        built = AutoConfig.for_model(**config)
        adapter_for(built)
        model = AutoModelForCausalLM.from_config(built, attn_implementation=attn_implementation)
    if vocab_size is not None and model.get_input_embeddings().num_embeddings < vocab_size:
        grow_vocabulary(model, vocab_size)
    return model


def grow_vocabulary(model: PreTrainedModel, vocab_size: int) -> None:
    """Resize the embedding table (and an untied LM head) to ``vocab_size`` rows for tokens the tokenizer added
    (``<image>``); each new row is the mean of the existing rows."""
    old = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for table in (model.get_input_embeddings(), model.get_output_embeddings()):
            if table is not None and table.weight.device.type != "meta":
                table.weight[old:] = table.weight[:old].mean(dim=0)  # [new, D]


def _llava_language_model(path: str, attn_implementation: str | None) -> PreTrainedModel:
    """The language model of an HF LLaVA folder (its ``text_config``), loaded strictly from the folder's
    ``language_model`` tensors (docs/checkpoints.md "LLaVA folders")."""
    llava = AutoConfig.from_pretrained(path)
    config = llava.text_config
    config.tie_word_embeddings = llava.tie_word_embeddings  # transformers ties a LLaVA's LM by the outer flag
    adapter_for(config)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    if not building_skeleton():
        tensors = read_part(path, "language")
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if head is not None and head.weight is embed.weight and "lm_head.weight" not in tensors:
            tensors["lm_head.weight"] = tensors.get("model.embed_tokens.weight")  # tied: saved once
        load_strict(model, tensors, f"{path} (language model)")
        model.tie_weights()
    return model
