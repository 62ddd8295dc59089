"""Named component registries, presets and plugin loading (ARCHITECTURE.md "Registry").

A component (vision encoder, projector, LLM backbone, ...) is a builder function or class registered under a
name. A recipe refers to it with a *spec*: ``{name: timm, model_name: vit_base_patch16_224, ...}``, a bare
name, or a *preset*, a small YAML file under ``registry/<kind>/<preset>.yaml`` that holds such a spec.

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

PLUGIN_GROUP = "skipvision.plugins"
PRESET_PATH_ENV = "SKIPVISION_PRESET_PATH"
BUILTIN_PRESET_DIR = Path(__file__).resolve().parent.parent / "registry"


class RegistryError(ValueError):
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
    so ``import skipvision.registry`` stays light.
    """

    def __init__(self, kind: str, builtins: str | None = None) -> None:
        self.kind = kind
        self._builtins = builtins
        self._entries: dict[str, Entry] = {}

    def register(
        self, name: str, *, tiny: Mapping[str, Any] | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register ``builder`` under ``name`` with its tiny spec (kwargs without ``name``)."""

        def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries and self._entries[name].builder is not builder:
                raise RegistryError(f"{self.kind} {name!r} is already registered by {self._entries[name].builder}")
            doc = inspect.getdoc(builder) or ""
            self._entries[name] = Entry(name, builder, dict(tiny or {}), doc.split("\n", 1)[0])
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

        Unknown arguments fail against the builder's signature before anything is built.
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
        return entry.builder(**kwargs)


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


def preset_dirs() -> list[Path]:
    """Folders searched for ``<kind>/<preset>.yaml``: $SKIPVISION_PRESET_PATH entries, then the built-in one."""
    extra = [Path(p) for p in os.environ.get(PRESET_PATH_ENV, "").split(os.pathsep) if p]
    return [*extra, BUILTIN_PRESET_DIR]


def preset_names(kind: str) -> list[str]:
    names = {p.stem for d in preset_dirs() for p in (d / kind).glob("*.yaml")}
    return sorted(names)


def load_preset(kind: str, preset: str) -> dict[str, Any]:
    for d in preset_dirs():
        path = d / kind / f"{preset}.yaml"
        if path.is_file():
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


ENCODERS = Registry("encoder", builtins="skipvision.encoders")
PROJECTORS = Registry("projector", builtins="skipvision.projectors")
BACKBONES = Registry("backbone", builtins="skipvision.backbones")

COMPRESSORS = Registry("compressor", builtins="skipvision.compressors")
SKIP_POLICIES = Registry("skip_policy", builtins="skipvision.skip.policies")

REGISTRIES: dict[str, Registry] = {r.kind: r for r in (ENCODERS, PROJECTORS, BACKBONES, COMPRESSORS, SKIP_POLICIES)}
