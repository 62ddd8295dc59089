"""Registry: lookups, argument checks, presets, and third-party plugins (recipe imports and entry points)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from skipvision import registry as reg
from skipvision.cli import main
from skipvision.registry import ENCODERS, PROJECTORS, REGISTRIES, Registry, RegistryError


def test_unknown_name_lists_close_matches_and_all_names() -> None:
    with pytest.raises(RegistryError) as err:
        ENCODERS.get("tim")
    msg = str(err.value)
    assert "Unknown encoder 'tim'" in msg
    assert "Did you mean: timm" in msg
    assert "Registered encoders: hf_clip, hf_siglip, timm." in msg


def test_unknown_kwarg_fails_before_building_and_names_valid_ones() -> None:
    built = []
    r = Registry("widget")
    r.register("w")(lambda size, depth=2: built.append((size, depth)))
    with pytest.raises(RegistryError) as err:
        r.build({"name": "w", "size": 3, "dpth": 4})
    assert "widget 'w' got unknown argument(s): dpth (did you mean depth?)." in str(err.value)
    assert "Valid arguments: size, depth." in str(err.value)
    with pytest.raises(RegistryError, match="missing required argument"):
        r.build("w")
    assert built == []
    r.build({"name": "w", "size": 3})
    assert built == [(3, 2)]


def test_wiring_cannot_be_set_by_the_recipe() -> None:
    with pytest.raises(RegistryError, match="in_dim is set by the framework"):
        PROJECTORS.build({"name": "linear", "in_dim": 3}, in_dim=4, out_dim=5)
    assert PROJECTORS.build("linear", in_dim=4, out_dim=5).weight.shape == (5, 4)


def test_presets_resolve_and_can_be_overridden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "projector").mkdir()
    (tmp_path / "projector" / "wide.yaml").write_text("name: linear\n")
    monkeypatch.setenv(reg.PRESET_PATH_ENV, str(tmp_path))
    assert "wide" in reg.preset_names("projector")
    assert PROJECTORS.build("wide", in_dim=2, out_dim=3).weight.shape == (3, 2)
    spec = reg.resolve_spec(ENCODERS, {"preset": "vit-shapes-tiny", "img_size": 32})
    assert spec["name"] == "timm" and spec["img_size"] == 32 and spec["model_kwargs"]["patch_size"] == 8
    with pytest.raises(RegistryError, match="Unknown encoder preset 'vit-shapes-tyni'.*Did you mean: vit-shapes-tiny"):
        reg.resolve_spec(ENCODERS, {"preset": "vit-shapes-tyni"})


def test_double_registration_of_a_different_builder_fails() -> None:
    r = Registry("thing")
    r.register("a")(lambda: 1)
    with pytest.raises(RegistryError, match="already registered"):
        r.register("a")(lambda: 2)


PLUGIN_SOURCE = """
    from torch import nn
    from skipvision.registry import PROJECTORS

    @PROJECTORS.register("{name}", tiny={{}})
    def build(in_dim: int, out_dim: int) -> nn.Module:
        '''A plugin projector.'''
        return nn.Linear(in_dim, out_dim, bias=False)
"""


@pytest.fixture
def projectors_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugins a test registers leave PROJECTORS afterwards, so later tests see only the built-ins (loaded
    first, so that the restored table holds them)."""
    PROJECTORS.names()
    monkeypatch.setattr(PROJECTORS, "_entries", dict(PROJECTORS._entries))


@pytest.mark.usefixtures("projectors_restored")
def test_recipe_imports_register_a_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_plugin_a.py").write_text(textwrap.dedent(PLUGIN_SOURCE.format(name="plugin_a")))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "plugin_a" not in PROJECTORS
    reg.import_modules(["my_plugin_a"])
    assert PROJECTORS.build("plugin_a", in_dim=2, out_dim=3).bias is None
    with pytest.raises(RegistryError, match="'no_such_module_xyz' could not be imported"):
        reg.import_modules(["no_such_module_xyz"])


@pytest.mark.usefixtures("projectors_restored")
def test_entry_point_plugin_is_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A real installed-distribution layout (dist-info with entry_points.txt) on sys.path."""
    (tmp_path / "my_plugin_b.py").write_text(textwrap.dedent(PLUGIN_SOURCE.format(name="plugin_b")))
    dist = tmp_path / "my_plugin_b-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin-b\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[skipvision.plugins]\nplugin_b = my_plugin_b\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "plugin_b" not in PROJECTORS
    assert main(["list", "projector"]) == 0
    out = capsys.readouterr().out
    assert "plugin_b" in out and "A plugin projector." in out and "mlp2x_gelu" in out
    assert "plugin_b" in PROJECTORS
    sys.modules.pop("my_plugin_b", None)


def test_cli_list_shows_components_and_presets(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("timm", "hf_clip", "hf_siglip", "mlp2x_gelu", "linear", "hf_causal_lm"):
        assert name in out
    assert "vit-shapes-tiny" in out and "llama-shapes-tiny" in out


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_catalogue_names_exactly_the_builtin_components(kind: str) -> None:
    """``list`` reads the catalogue instead of importing the built-ins, so it must not drift from them."""
    registry = REGISTRIES[kind]
    builtins = sorted(e.name for e in registry.entries() if e.builder.__module__.startswith("skipvision."))
    assert builtins == sorted(registry.catalogue)
    assert all(registry.get(name).description == text for name, text in registry.catalogue.items())


def test_presets_from_the_preset_path_override_shipped_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "encoder").mkdir()
    (tmp_path / "encoder" / "vit-shapes-tiny.yaml").write_text("name: hf_clip\n")
    shipped = reg.preset_files("encoder")["vit-shapes-tiny"]
    assert shipped.name == "vit-shapes-tiny.yaml" and reg.load_preset("encoder", "vit-shapes-tiny")["name"] == "timm"
    monkeypatch.setenv(reg.PRESET_PATH_ENV, str(tmp_path))
    assert reg.preset_files("encoder")["vit-shapes-tiny"] == tmp_path / "encoder" / "vit-shapes-tiny.yaml"
    assert reg.load_preset("encoder", "vit-shapes-tiny") == {"name": "hf_clip"}
