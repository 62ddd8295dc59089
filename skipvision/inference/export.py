"""A trained run -> a self-contained, Lightning-free model folder, and loading it back (docs/checkpoints.md "Export").

``skipvision export --checkpoint RUN --out DIR`` writes::

    config.json            format, the model's component specs (configurations only, no base folders), skip settings
    model*.safetensors     the vision side: encoder, projector, skip tokens (sharded above --max-shard-size)
    llm/                   the language model as transformers saves it: AutoModelForCausalLM.from_pretrained loads it
    tokenizer files        with the chat template the run trained with
    preprocessor_config.json   the image processor, when the encoder had one
    recipe.yaml            the resolved recipe the run trained with
    README.md              a model card: the parts, the skip settings, how to load it

Nothing in it points outside the folder, so it can move anywhere; :func:`load_export` rebuilds the model from the
configurations and loads every tensor strictly. A model without skipping can instead be written in transformers' LLaVA
layout (:func:`export_llava_hf`). Only what the paper's workflow uses is portable here: encoders
``hf_clip``/``hf_siglip``/``timm``, projectors ``mlp2x_gelu``/``linear``, backbone ``hf_causal_lm``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from transformers import (
    AutoImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)

from skipvision.adapters import decoder_layers
from skipvision.data.samples import IMAGE_PLACEHOLDER
from skipvision.data.tokenizer import load_tokenizer
from skipvision.encoders.hf_vision import HFVisionTower
from skipvision.errors import OutputExistsError, UnsupportedModelError
from skipvision.inference.checkpoint import CheckpointError, load_model
from skipvision.model import VisionLanguageModel
from skipvision.projectors import MLPProjector
from skipvision.recipe import load_recipe, save_recipe
from skipvision.registry import BACKBONES, ENCODERS, PROJECTORS, resolve_spec
from skipvision.skip.layout import SlotLayout
from skipvision.weights.llava import IN_MEMORY_LAYOUT
from skipvision.weights.strict import load_strict

FORMAT = "skipvision-export"
FORMATS = ("skipvision", "llava-hf")
LLM_FOLDER = "llm"
HERE = "."  # a path in config.json that means the export folder itself


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`export`."""
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("format") == FORMAT


def portable_specs(recipe: DictConfig, model: VisionLanguageModel) -> dict[str, Any]:
    """The ``model`` section with every component rebuilt from configurations only (no pretrained folders)."""
    encoder = resolve_spec(ENCODERS, recipe.model.encoder)
    if encoder["name"] in ("hf_clip", "hf_siglip"):
        tower = model.encoder
        config = {**tower.tower.config.to_dict(), "num_hidden_layers": len(tower.blocks())}
        encoder = {
            "name": encoder["name"],
            "config": {k: v for k, v in config.items() if k not in ("transformers_version", "architectures")},
            "feature_layer": -1,  # the layers past the feature layer are gone already
            "drop_tokens": tower.prefix_tokens,
            "pad_to_square": tower.pad_to_square,
            "processor": HERE if tower.image_processor_folder() is not None else None,
        }
    elif encoder["name"] == "timm":
        encoder = {**encoder, "pretrained": False, "checkpoint_path": None}
    else:
        raise UnsupportedModelError(
            f"export: encoder {encoder['name']!r} is not portable; supported: hf_clip, hf_siglip, timm"
        )
    projector = resolve_spec(PROJECTORS, recipe.model.projector)
    if isinstance(model.projector, MLPProjector):
        projector = {"name": "mlp2x_gelu", "activation": model.projector.activation, "bias": model.projector.bias}
    elif projector["name"] != "linear":
        raise UnsupportedModelError(
            f"export: projector {projector['name']!r} is not portable; supported: mlp2x_gelu, linear"
        )
    if resolve_spec(BACKBONES, recipe.model.backbone)["name"] != "hf_causal_lm":
        raise UnsupportedModelError("export: only the hf_causal_lm backbone is portable")
    return {
        "encoder": encoder,
        "projector": {"name": projector["name"], **{k: v for k, v in projector.items() if k != "name"}},
        "backbone": {"name": "hf_causal_lm", "path": LLM_FOLDER},
        "skip": OmegaConf.to_container(recipe.model.skip, resolve=True),
        "tiles": OmegaConf.to_container(recipe.model.tiles, resolve=True) if recipe.model.tiles else None,
    }


def model_card(config: dict[str, Any], recipe: DictConfig) -> str:
    """README.md of an export: what it is, its skip settings, how to load it."""
    skip = json.dumps(config["model"]["skip"])
    return f"""# {recipe.name}

A vision-language model trained with skipvision (Skip-Vision: Skip-FFN training, skip KV-cache inference).

- vision encoder: `{config["model"]["encoder"]["name"]}`, projector: `{config["model"]["projector"]["name"]}`
- language model: `{LLM_FOLDER}/`, an ordinary transformers causal LM
  (`AutoModelForCausalLM.from_pretrained("{LLM_FOLDER}")`)
- skip settings: `{skip}`
- the recipe it was trained with: `recipe.yaml`

Load and generate (no Lightning, no base checkpoints needed):

```python
from skipvision import VLMGenerator
from skipvision.inference import Request
gen = VLMGenerator.from_checkpoint("path/to/this/folder")
print(gen.generate([Request("What is in the picture?", "cat.jpg")])[0].text)
```

or `python -m skipvision generate --checkpoint path/to/this/folder --prompt "..." --image cat.jpg`.
"""


def export(path: str | Path, out: str | Path, max_shard_size: str = "5GB", fmt: str = "skipvision") -> Path:
    """Write the model of a run (folder, ``.ckpt`` or FSDP shard folder) as a self-contained folder ``out``, in
    skipvision's layout or, for a model without skipping, in transformers' LLaVA layout (``fmt="llava-hf"``)."""
    out = Path(out)
    if fmt not in FORMATS:
        raise UnsupportedModelError(f"export format {fmt!r} is unknown; formats: {', '.join(FORMATS)}")
    if out.exists() and any(out.iterdir()):
        raise OutputExistsError(f"{out} is not empty; export writes into a new or empty folder")
    model, tokenizer, recipe = load_model(path)
    if recipe is None:
        raise CheckpointError(f"{path} is not a training run (an HF LLaVA folder is already a transformers checkpoint)")
    if fmt == "llava-hf":
        return export_llava_hf(model, tokenizer, out, max_shard_size)
    config = {"format": FORMAT, "version": 1, "model": portable_specs(recipe, model), "image_token": IMAGE_PLACEHOLDER}
    out.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(out / LLM_FOLDER, max_shard_size=max_shard_size)
    vision = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    save_torch_state_dict(vision, out, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    processor = model.encoder.image_processor_folder()
    if processor is not None:
        AutoImageProcessor.from_pretrained(processor).save_pretrained(out)
    save_recipe(recipe, out / "recipe.yaml")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "README.md").write_text(model_card(config, recipe))
    return out


def export_llava_hf(
    model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase, out: Path, max_shard_size: str
) -> Path:
    """A model without skipping, with a CLIP or SigLIP tower and the ``mlp2x_gelu`` projector, as a folder that
    transformers' ``LlavaForConditionalGeneration`` loads: the tower cut at its feature layer (LLaVA's feature layer
    becomes its last, -1), the projector's layers as ``linear_1``/``linear_2``."""
    tower = model.encoder
    num_layers = len(decoder_layers(model.backbone))
    plain = model.visual.layout == SlotLayout(model.visual.num_tokens) and model.tiles is None
    if not plain or model.drop_stages(training=True) or model.visual.policy.routed_layers(num_layers):
        raise UnsupportedModelError(
            "--format llava-hf holds no skipping, merging, trained in-LLM drops or routers, or HD tiles: export such "
            "a model in the skipvision format"
        )
    if tower.pad_to_square:
        raise UnsupportedModelError("--format llava-hf does not carry pad_to_square; use the skipvision format")
    if not isinstance(tower, HFVisionTower) or not isinstance(model.projector, MLPProjector):
        raise UnsupportedModelError(
            "--format llava-hf needs an hf_clip or hf_siglip encoder and the mlp2x_gelu projector"
        )
    vision = tower.tower.config.to_dict()
    vision["num_hidden_layers"] = len(tower.blocks())
    config = LlavaConfig(
        vision_config=vision,
        text_config=model.backbone.config.to_dict(),
        image_token_id=model.image_token_id,
        image_seq_length=model.num_image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full" if tower.prefix_tokens == 0 else "default",
        projector_hidden_act=model.projector.activation,
        multimodal_projector_bias=model.projector.bias,
    )
    llava = LlavaForConditionalGeneration(config)
    parts = {"vision": "encoder.tower.", "projector": "projector.", "language": "backbone."}  # ours, per LLaVA part
    renames = [(parts[part] + ours, theirs) for part, pairs in IN_MEMORY_LAYOUT.items() for theirs, ours in pairs]
    state = {}
    for key, tensor in model.state_dict().items():
        for ours, theirs in renames:
            if key.startswith(ours):
                state[theirs + key[len(ours) :]] = tensor
    load_strict(llava, state, "the model (llava-hf export)")
    llava.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    folder = tower.image_processor_folder()
    if folder is not None:  # transformers' own processor: AutoProcessor.from_pretrained(out) prepares prompts
        LlavaProcessor(
            image_processor=AutoImageProcessor.from_pretrained(folder),
            tokenizer=tokenizer,
            patch_size=tower.tower.config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=tower.tokens_before_patches,
            image_token=IMAGE_PLACEHOLDER,
        ).save_pretrained(out)
    return out


def _resolve(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Relative paths in an exported spec point into the export folder."""
    paths = ("path", "processor")
    return {k: str(folder / v) if k in paths and isinstance(v, str) else v for k, v in spec.items()}


def _vision_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def load_export(folder: str | Path) -> tuple[VisionLanguageModel, PreTrainedTokenizerBase, DictConfig]:
    """The model of an export folder (eval mode), its tokenizer and the recipe it trained with; every tensor is
    loaded strictly."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    specs = config["model"]
    tokenizer = load_tokenizer(folder)
    model = VisionLanguageModel.from_specs(
        _resolve(specs["encoder"], folder),
        specs["projector"],
        _resolve(specs["backbone"], folder),
        tokenizer,
        config["image_token"],
        skip=specs["skip"],
        tiles=specs["tiles"],
    )
    backbone = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}  # loaded by transformers
    load_strict(model, {**_vision_tensors(folder), **backbone}, f"{folder} (export)")
    return model.eval(), tokenizer, load_recipe(folder / "recipe.yaml")
