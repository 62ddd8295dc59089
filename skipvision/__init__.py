"""skipvision: Skip-Vision (ICCV 2025) for vision-language models on unmodified HF transformers and Lightning.

The public API (docs/cli.md "Python API")::

    import skipvision

    cfg = skipvision.load_recipe("shapes-tiny", ["model.skip.num_skipped=8"])  # a shipped recipe, or a YAML path
    model, tokenizer = skipvision.create_model("shapes-tiny")                # freshly initialised, as fit builds it
    skipvision.ENCODERS.names()                                              # the component registries
    gen = skipvision.VLMGenerator.from_checkpoint("runs/shapes-tiny")        # a trained model, ready to answer
    [out] = gen.generate([skipvision.Request("What colour?", image="a.png")], skipvision.GenerationConfig())

Every error a user can cause is a :class:`SkipvisionError` (docs/cli.md "Errors"). The names load on first access,
so ``import skipvision`` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from skipvision.lazy import lazy_exports

if TYPE_CHECKING:
    from skipvision.api import create_model
    from skipvision.errors import SkipvisionError
    from skipvision.inference.generate import Generation
    from skipvision.inference.generator import Request, VLMGenerator
    from skipvision.inference.sampling import GenerationConfig
    from skipvision.model import VisionLanguageModel
    from skipvision.recipe import load_recipe
    from skipvision.registry import BACKBONES, COMPRESSORS, ENCODERS, PROJECTORS, REGISTRIES, SKIP_POLICIES

__version__ = "0.1.0"

_MODULES = {
    "load_recipe": "skipvision.recipe",
    "create_model": "skipvision.api",
    "VisionLanguageModel": "skipvision.model",
    "ENCODERS": "skipvision.registry",
    "PROJECTORS": "skipvision.registry",
    "BACKBONES": "skipvision.registry",
    "COMPRESSORS": "skipvision.registry",
    "SKIP_POLICIES": "skipvision.registry",
    "REGISTRIES": "skipvision.registry",
    "VLMGenerator": "skipvision.inference.generator",
    "Request": "skipvision.inference.generator",
    "Generation": "skipvision.inference.generate",
    "GenerationConfig": "skipvision.inference.sampling",
    "SkipvisionError": "skipvision.errors",
}

__all__ = [
    "BACKBONES",
    "COMPRESSORS",
    "ENCODERS",
    "PROJECTORS",
    "REGISTRIES",
    "SKIP_POLICIES",
    "Generation",
    "GenerationConfig",
    "Request",
    "SkipvisionError",
    "VLMGenerator",
    "VisionLanguageModel",
    "__version__",
    "create_model",
    "load_recipe",
]


__getattr__, __dir__ = lazy_exports(__name__, _MODULES, __all__)
