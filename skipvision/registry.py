"""Named component registries, presets and plugin loading (docs/design.md "Registry").

A component (vision encoder, projector, LLM backbone, ...) is a builder function or class registered under a
name. A recipe refers to it with a *spec*: ``{name: timm, model_name: vit_base_patch16_224, ...}``, a bare
name, or a *preset*, a small YAML file under ``registry/<kind>/<preset>.yaml`` that holds such a spec (shipped
inside the package, skipvision/resources.py; ``$SKIPVISION_PRESET_PATH`` adds folders).

Built-in components are imported on first use (they pull in torch), but each registry also holds a *catalogue* of
its built-ins' names and descriptions, so ``skipvision list`` answers without importing them (docs/cli.md "Startup").

Every component declares a tiny, download-free configuration (``tiny=``) that tests build automatically, so
registering a component adds it to the test matrix. Third-party packages register components through the
``skipvision.plugins`` entry-point group or a recipe's ``imports:`` list.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from skipvision.errors import MissingFileError, SkipvisionError
from skipvision.resources import shipped_presets

PLUGIN_GROUP = "skipvision.plugins"
PRESET_PATH_ENV = "SKIPVISION_PRESET_PATH"


class RegistryError(SkipvisionError, ValueError):
    """A registry lookup or build failed; the message names the culprit and the valid choices."""


@dataclass(frozen=True)
class Entry:
    """One registered component: its builder and its tiny, download-free spec."""

    name: str
    builder: Callable[..., Any]
    tiny: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def _close(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else ""


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


class Registry:
    """A mapping from names to component builders of one kind.

    ``builtins`` names the module that registers this kind's built-in components; it is imported on first use,
    so ``import skipvision.registry`` stays light. ``catalogue`` maps each built-in's name to its description:
    :meth:`listing` reads it instead of importing the built-ins, and it is their :attr:`Entry.description`
    (a test checks that it names exactly the components the built-in module registers).
    """

    def __init__(self, kind: str, builtins: str | None = None, catalogue: Mapping[str, str] | None = None) -> None:
        self.kind = kind
        self.catalogue = dict(catalogue or {})
        self._builtins = builtins
        self._entries: dict[str, Entry] = {}

    def register(
        self, name: str, *, tiny: Mapping[str, Any] | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register ``builder`` under ``name`` with its tiny spec (kwargs without ``name``)."""

        def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries and self._entries[name].builder is not builder:
                raise RegistryError(f"{self.kind} {name!r} is already registered by {self._entries[name].builder}")
            description = self.catalogue.get(name) or (inspect.getdoc(builder) or "").split("\n", 1)[0]
            self._entries[name] = Entry(name, builder, dict(tiny or {}), description)
            return builder

        return decorator

    def _load(self) -> None:
        if self._builtins is not None:
            module, self._builtins = self._builtins, None
            importlib.import_module(module)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def listing(self) -> list[tuple[str, str]]:
        """(name, description) of every component, sorted by name, without importing the built-ins."""
        described = {**self.catalogue, **{e.name: e.description for e in self._entries.values()}}
        return sorted(described.items())

    def get(self, name: str) -> Entry:
        self._load()
        if name not in self._entries:
            names = self.names()
            raise RegistryError(
                f"Unknown {self.kind} {name!r}.{_suggest(name, names)} Registered {self.kind}s: {', '.join(names)}."
            )
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def tiny_spec(self, name: str) -> dict[str, Any]:
        """The component's download-free test configuration as a full spec."""
        return {"name": name, **self.get(name).tiny}

    def build(self, spec: str | Mapping[str, Any], *, optional: Mapping[str, Any] | None = None, **wiring: Any) -> Any:
        """Build a component from a spec; ``wiring`` holds arguments the framework supplies (sizes, tokenizer),
        ``optional`` those it supplies only to builders that take them (e.g. a learned policy's width).

        Unknown arguments fail against the builder's signature before anything is built. A file the builder does
        not find is one the spec named (a checkpoint, a model folder): it becomes a :class:`MissingFileError`
        naming the component.
        """
        spec = resolve_spec(self, spec)
        name = spec.pop("name")
        entry = self.get(name)
        accepted = inspect.signature(entry.builder).parameters
        wiring.update({k: v for k, v in (optional or {}).items() if k in accepted})
        clash = sorted(set(spec) & set(wiring))
        if clash:
            raise RegistryError(f"{self.kind} {name!r}: {', '.join(clash)} is set by the framework, not the recipe")
        kwargs = {**spec, **wiring}
        check_arguments(f"{self.kind} {name!r}", entry.builder, kwargs)
        try:
            return entry.builder(**kwargs)
        except FileNotFoundError as err:
            raise MissingFileError(f"{self.kind} {name!r}: {err}") from err


def check_arguments(what: str, fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    """Fail fast, naming the valid arguments, when ``kwargs`` do not fit ``fn``'s signature."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        named = ", ".join(f"{k}{_close(k, valid)}" for k in unknown)
        raise RegistryError(f"{what} got unknown argument(s): {named}. Valid arguments: {', '.join(valid)}.")
    missing = [n for n in valid if params[n].default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise RegistryError(f"{what} is missing required argument(s): {', '.join(missing)}.")


# --- presets ------------------------------------------------------------------------------------------------


def preset_files(kind: str) -> dict[str, Path]:
    """Every preset of a kind by name: the shipped ones, overridden by those in the folders of
    ``$SKIPVISION_PRESET_PATH`` (``<folder>/<kind>/<preset>.yaml``; earlier folders win)."""
    found = shipped_presets(kind)
    extra = [Path(p) for p in os.environ.get(PRESET_PATH_ENV, "").split(os.pathsep) if p]
    for folder in reversed(extra):
        found.update({p.stem: p for p in (folder / kind).glob("*.yaml")})
    return found


def preset_names(kind: str) -> list[str]:
    return sorted(preset_files(kind))


def load_preset(kind: str, preset: str) -> dict[str, Any]:
    path = preset_files(kind).get(preset)
    if path is not None:
        spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        if not isinstance(spec, dict) or "name" not in spec:
            raise RegistryError(f"Preset {path} must be a mapping with a 'name' key")
        return spec
    names = preset_names(kind)
    raise RegistryError(
        f"Unknown {kind} preset {preset!r}.{_suggest(preset, names)} {kind} presets: {', '.join(names) or '(none)'}."
    )


def resolve_spec(registry: Registry, spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """Turn a bare name, a preset reference or a spec mapping into a plain ``{name: ..., **kwargs}`` dict.

    A string is a preset if one exists by that name, else a registered component name. A mapping with
    ``preset: P`` starts from preset P and overrides its keys with the mapping's other keys.
    """
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)  # type: ignore[assignment]
    if isinstance(spec, str):
        if spec in preset_names(registry.kind):
            return load_preset(registry.kind, spec)
        registry.get(spec)
        return {"name": spec}
    spec = dict(spec)
    if "preset" in spec:
        spec = {**load_preset(registry.kind, spec.pop("preset")), **spec}
    if "name" not in spec:
        raise RegistryError(
            f"A {registry.kind} spec needs 'name' (one of: {', '.join(registry.names())}) or 'preset' "
            f"(one of: {', '.join(preset_names(registry.kind)) or '(none)'}); got keys {sorted(spec)}"
        )
    return spec


# --- plugins ------------------------------------------------------------------------------------------------

_loaded_plugins: set[str] = set()


def import_modules(modules: list[str]) -> None:
    """Import modules named in a recipe's ``imports:`` list; importing them registers their components."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise RegistryError(f"Recipe 'imports:' entry {module!r} could not be imported: {err}") from err


def load_entry_point_plugins() -> list[str]:
    """Load every ``skipvision.plugins`` entry point once; a callable target is called after import."""
    loaded = []
    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.value in _loaded_plugins:
            continue
        try:
            target = ep.load()
        except Exception as err:
            raise RegistryError(f"Plugin entry point {ep.name!r} ({ep.value}) failed to load: {err}") from err
        if callable(target):
            target()
        _loaded_plugins.add(ep.value)
        loaded.append(ep.name)
    return loaded


ENCODERS = Registry(
    "encoder",
    builtins="skipvision.encoders",
    catalogue={
        "timm": "any timm model; features of block feature_layer, prefix tokens dropped, later blocks pruned",
        "hf_clip": "HF CLIP vision tower from a config dict or a local path (a full CLIP folder works); CLS dropped",
        "hf_siglip": "HF SigLIP vision tower from a config dict or a local path; it has no CLS token",
    },
)
PROJECTORS = Registry(
    "projector",
    builtins="skipvision.projectors",
    catalogue={
        "mlp2x_gelu": "two-layer MLP with GELU, as in LLaVA-1.5",
        "linear": "a single linear map, as in the original LLaVA",
    },
)
BACKBONES = Registry(
    "backbone",
    builtins="skipvision.backbones",
    catalogue={"hf_causal_lm": "any AutoModelForCausalLM from a config dict (with model_type) or a local path"},
)
COMPRESSORS = Registry(
    "compressor",
    builtins="skipvision.compressors",
    catalogue={
        "token_merge": "bipartite mean merge of the skip candidates to N_s tokens, destinations in spatial order",
        "avg_pool": "adaptive average pooling of the skip candidates to N_s tokens, in their given order",
        "identity": "no merge: the skip candidates unchanged",
    },
)
SKIP_POLICIES = Registry(
    "skip_policy",
    builtins="skipvision.skip.policies",
    catalogue={
        "none": "the full model: every token retained, nothing merged or skipped",
        "uniform": "retains N_r evenly spread raster positions",
        "attention_score": "retains the top N_r by the encoder's [CLS] attention (mean-similarity fallback)",
        "router": "retains the top N_r by a learned score, with an auxiliary loss",
        "prefix": "retains the first N_r tokens (the LLaVA-HD thumbnail)",
        "merge_only": "peer: merges all N tokens to num_tokens, every one with FFN (compression only)",
        "fastv": "peer: training-free FastV, drops the least-attended image tokens from layer K on",
        "pyramid_drop": "peer: PyramidDrop, drops half the least-attended image tokens at each stage, also in training",
        "mod_router": "peer: p-MoD-style learned router per layer, the top share of image tokens runs that layer's FFN",
    },
)

REGISTRIES: dict[str, Registry] = {r.kind: r for r in (ENCODERS, PROJECTORS, BACKBONES, COMPRESSORS, SKIP_POLICIES)}
