"""An HF LLaVA checkpoint folder (``LlavaForConditionalGeneration``, e.g. llava-hf/llava-1.5-7b-hf) as the source of
the three parts skipvision builds separately: vision tower, projector, language model (docs/checkpoints.md
"LLaVA folders").

Two key layouts exist: the one llava-hf publishes and transformers writes (``vision_tower.``,
``multi_modal_projector.``, ``language_model.model.``, ``language_model.lm_head.``) and transformers' in-memory one
(``model.vision_tower.``, ``model.multi_modal_projector.``, ``model.language_model.``, ``lm_head.``). Folders saved by
transformers 4 (the published llava-hf checkpoints) also nest the tower's keys under ``vision_model.``; transformers 5
flattened CLIP and SigLIP towers, and so does skipvision. Each part's
tensors come back under the names of the module skipvision builds for it. The original LLaVA's stage-1 projector
file (``mm_projector.bin``, keys ``model.mm_projector.<i>.``) is read here too, with ``weights_only``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from skipvision.errors import MissingFileError
from skipvision.weights.strict import WeightsMismatchError

# part -> (checkpoint prefix, module prefix) pairs, per layout
LAYOUTS = (
    {
        "vision": (("vision_tower.", ""),),
        "projector": (("multi_modal_projector.linear_1.", "0."), ("multi_modal_projector.linear_2.", "2.")),
        "language": (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
    },
    {
        "vision": (("model.vision_tower.", ""),),
        "projector": (("model.multi_modal_projector.linear_1.", "0."), ("model.multi_modal_projector.linear_2.", "2.")),
        "language": (("model.language_model.", "model."), ("lm_head.", "lm_head.")),
    },
)
IN_MEMORY_LAYOUT = LAYOUTS[1]  # what LlavaForConditionalGeneration's state dict holds (export writes it)
TOWERS = {"clip_vision_model": "hf_clip", "siglip_vision_model": "hf_siglip"}  # vision_config -> our encoder
ORIGINAL_PROJECTOR = "model.mm_projector."  # the original LLaVA's stage-1 file: model.mm_projector.0/2.weight
NESTED_TOWER = "vision_model."  # transformers 4's CLIP/SigLIP towers: vision_tower.vision_model.encoder...


def llava_config(path: str | Path) -> dict | None:
    """The folder's config.json as a dict when it is a LLaVA checkpoint (``model_type`` llava), else None."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    return data if data.get("model_type") == "llava" else None


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MissingFileError(f"{folder} holds no *.safetensors weights")
    return files


def read_part(folder: str | Path, part: str) -> dict[str, torch.Tensor]:
    """The tensors of one part (``vision``, ``projector``, ``language``) of a LLaVA folder, renamed for the module
    skipvision builds; only that part's tensors are read."""
    folder = Path(folder)
    out: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            layout = next((lay for lay in LAYOUTS if any(k.startswith(p) for p, _ in lay[part] for k in keys)), None)
            if layout is None:
                continue
            for key in keys:
                for prefix, renamed in layout[part]:
                    if key.startswith(prefix):
                        name = key[len(prefix) :]
                        if part == "vision":
                            name = name.removeprefix(NESTED_TOWER)
                        out[renamed + name] = f.get_tensor(key)
    return out


def read_projector_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A projector weight file: the original LLaVA's ``mm_projector.bin`` (a torch file, loaded with
    ``weights_only``), a safetensors file, or a LLaVA folder; keys come back as ``0.weight``, ``2.bias``, ..."""
    path = Path(path)
    if path.is_dir():
        return read_part(path, "projector")
    if not path.is_file():
        raise MissingFileError(f"No projector weights at {path}")
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise WeightsMismatchError(f"{path} is not a state dict of tensors")
    return {k.removeprefix(ORIGINAL_PROJECTOR): v for k, v in state.items()}
