"""Other tools' plugin interfaces to skipvision models, found through the entry points pyproject.toml declares.

lmms-eval's model ``skipvision`` (docs/evaluation.md "lmms-eval") is :mod:`.lmms_eval`. lmms-eval loads every
entry point of its group ``lmms_eval.models`` whenever it starts, whatever ``--model`` asks for, so the entry point
is :func:`lmms_eval_manifest` here: it only names the class, and the adapter (with torch and the model code) is
imported when ``--model skipvision`` is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmms_eval.models.registry_v2 import ModelManifest


def lmms_eval_manifest() -> ModelManifest:
    """lmms-eval's model id ``skipvision`` and the class that implements it."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="skipvision", simple_class_path="skipvision.integrations.lmms_eval.SkipVisionLMM")
