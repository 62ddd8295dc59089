"""Recipes: validation errors, defaults inheritance, overrides, and print-recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from skipvision.cli import main
from skipvision.recipe import RecipeError, load_recipe, merge_specs

from .conftest import TINY_RECIPE


def test_unknown_top_level_key_names_it_and_the_valid_keys(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("sead: 3\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "Unknown recipe key 'sead'. Did you mean: seed" in msg
    assert "Valid keys at the top level: name, seed, output_dir, imports, data, model" in msg


def test_unknown_nested_key_in_an_override() -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe("shapes-tiny", ["data.batchsize=4"])
    assert "Unknown recipe key 'data.batchsize'" in str(err.value)
    assert "Did you mean: batch_size" in str(err.value)
    assert "Valid keys under 'data': root, shapes" in str(err.value)


def test_bad_values_and_choices_fail_clearly() -> None:
    with pytest.raises(RecipeError, match="trainer.max_steps"):
        load_recipe("shapes-tiny", ["trainer.max_steps=many"])
    with pytest.raises(RecipeError, match="'data.on_error' is 'ignore'; valid values: skip, raise"):
        load_recipe("shapes-tiny", ["data.on_error=ignore"])
    with pytest.raises(RecipeError, match="not of the form key=value"):
        load_recipe("shapes-tiny", ["trainer.max_steps"])
    with pytest.raises(RecipeError, match="Recipe 'no-such-recipe' not found.*shapes-tiny"):
        load_recipe("no-such-recipe")


def test_defaults_inheritance_and_override_order() -> None:
    cfg = load_recipe(TINY_RECIPE, ["trainer.max_steps=7"])
    assert cfg.name == "tiny" and cfg.output_dir == "runs/tiny"  # interpolation resolved after inheritance
    assert cfg.trainer.max_steps == 7  # command line beats the file
    assert cfg.optim.lr == 1.0e-3  # inherited from shapes-tiny
    assert cfg.model.backbone.config.hidden_size == 32  # the child's spec
    assert cfg.model.projector == "mlp2x_gelu"


def test_switching_component_replaces_its_spec() -> None:
    base = {"encoder": {"name": "timm", "model_name": "vit", "img_size": 32}}
    assert merge_specs(base, {"encoder": {"img_size": 64}})["encoder"] == {
        "name": "timm",
        "model_name": "vit",
        "img_size": 64,
    }
    assert merge_specs(base, {"encoder": {"name": "hf_clip", "path": "x"}})["encoder"] == {
        "name": "hf_clip",
        "path": "x",
    }


def test_defaults_cycle_and_missing_parent(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("defaults: [nope.yaml]\n")
    with pytest.raises(RecipeError, match="lists defaults 'nope.yaml'"):
        load_recipe(tmp_path / "c.yaml")


def test_print_recipe_prints_the_resolved_yaml(capsys) -> None:
    assert main(["print-recipe", "--recipe", str(TINY_RECIPE), "data.batch_size=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["batch_size"] == 3
    assert printed["output_dir"] == "runs/tiny"
    assert printed["model"]["encoder"]["model_kwargs"]["depth"] == 2


def test_cli_reports_recipe_errors_without_traceback(capsys) -> None:
    assert main(["print-recipe", "--recipe", "shapes-tiny", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("skipvision print-recipe: error: Unknown recipe key 'optim.lrr'")
    assert "Traceback" not in err


def test_inline_component_specs_do_not_inherit_schema_defaults(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  encoder: vit-shapes-tiny\n  backbone: {name: hf_causal_lm, path: /models/llm}\n")
    cfg = load_recipe(path)
    assert dict(cfg.model.backbone) == {"name": "hf_causal_lm", "path": "/models/llm"}
    path.write_text("model:\n  encoder: vit-shapes-tiny\n")
    with pytest.raises(RecipeError, match="Recipe key 'model.backbone' is required"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "bench.repeat=3",
            "Unknown recipe key 'bench.repeat'. Did you mean: repeats? Valid keys under 'bench': baseline, variants,",
        ),
        (
            "data.shapes.num_trian=3",
            "Unknown recipe key 'data.shapes.num_trian'. Did you mean: num_train, num_val? Valid keys under "
            "'data.shapes': generate, num_train,",
        ),
    ],
)
def test_harness_sections_reject_unknown_keys_like_the_core(override: str, expected: str) -> None:
    """``bench`` and ``data.shapes`` are defined by their harnesses but validated with the same one-line message."""
    with pytest.raises(RecipeError) as err:
        load_recipe("shapes-tiny", [override])
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)
