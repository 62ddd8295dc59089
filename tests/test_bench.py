"""``python -m skipvision bench`` on the tiny model: every variant measured, exact KV shares, measured FLOPs against
the analytic model, accuracy from training or checkpoints, output files, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from skipvision.bench.runner import build_variants, variant_recipes
from skipvision.cli import main
from skipvision.costs import LayerTokens, TokenSchedule, model_schedule, prefill_flops
from skipvision.flops import LLMShape
from skipvision.paper import build_meta_model
from skipvision.recipe import RecipeError, load_recipe

from .conftest import TESTS

BENCH = TESTS / "recipes" / "bench-tiny.yaml"
VARIANTS = ["full", "skip_vision", "merge_only", "fastv", "pyramid_drop", "mod_router", "mod_router_layer"]


@pytest.fixture(scope="module")
def bench_run(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--recipe", str(BENCH), "--train-steps", "2", f"data.root={tiny_shapes}", f"output_dir={out}"]
    assert main(argv) == 0
    return out, json.loads((out / "bench.json").read_text())


def test_every_variant_has_every_figure(bench_run) -> None:
    out, result = bench_run
    assert list(result["variants"]) == VARIANTS and result["baseline"] == "full"
    for fig in result["variants"].values():
        for key in ("train_step_ms", "train_peak_mem_bytes", "prefill_flops", "ttft_ms", "kv_bytes"):
            assert fig[key] > 0
        assert set(fig["decode_ms_per_token"]) == {"1", "4"}
        assert 0.0 <= fig["accuracy"]["all"] <= 1.0
    assert all(v == 1.0 for v in result["variants"]["full"]["ratio"].values())
    assert set(result["hook_overhead"]) == {"plain_step_ms", "hooked_step_ms", "overhead"}
    table = (out / "bench.md").read_text()
    assert all(f"| {name} |" in table for name in VARIANTS)
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kv_bytes_are_the_exact_kept_share(bench_run) -> None:
    _, result = bench_run
    v = result["variants"]
    slots = {"full": 16, "skip_vision": 10, "merge_only": 10, **dict.fromkeys(PEERS, 16)}
    assert {n: v[n]["visual_slots"] for n in VARIANTS} == slots
    text = v["full"]["prompt_tokens"] - 16
    kept = {"full": text + 16, "skip_vision": text + 6, "merge_only": text + 10, "fastv": text + 16 - 8}
    kept |= {"pyramid_drop": text + 16 - 8, "mod_router": text + 16}  # mod_router's routed tokens stay cached
    kept["mod_router_layer"] = text + 16 - (4 + 8) / 2  # 2 layers: the shifted cosine keeps 12 and 8 of 16
    assert {n: v[n]["ideal"]["kv_positions"] for n in VARIANTS} == kept
    for name in VARIANTS:
        assert v[name]["ratio"]["kv_bytes"] == v[name]["ideal_ratio"]["kv_bytes"] == kept[name] / kept["full"]


def test_measured_prefill_flops_against_the_analytic_model(bench_run) -> None:
    _, result = bench_run
    v = result["variants"]
    # Exactly the vision side's measured FLOPs plus the LLM's from the token schedule, with the in-LLM methods' own
    # selection work (FastV's and PyramidDrop's scoring rows, mod_router's routers) in their schedules.
    for name in VARIANTS:
        assert v[name]["prefill_flops"] == v[name]["ideal"]["prefill_flops"], name
    for name in ("skip_vision", *PEERS):
        assert v[name]["ratio"]["prefill_flops"] < 1, name


def test_fastv_is_evaluated_with_the_full_models_weights(bench_run, tiny_shapes: Path) -> None:
    out, result = bench_run
    ckpt = out / "full" / "checkpoints" / "step=2.ckpt"
    assert ckpt.is_file() and not (out / "fastv" / "checkpoints").exists()  # training-free: never trained
    argv = ["bench", "--recipe", str(BENCH), f"data.root={tiny_shapes}", f"output_dir={out / 'again'}"]
    assert main([*argv, "--checkpoint", f"full={ckpt}"]) == 0
    again = json.loads((out / "again" / "bench.json").read_text())["variants"]
    assert again["full"]["accuracy"] == result["variants"]["full"]["accuracy"]
    assert again["fastv"]["accuracy"] == result["variants"]["fastv"]["accuracy"]
    assert again["skip_vision"]["accuracy"] is None  # neither trained nor given


def test_variants_build_from_the_same_seed(tiny_shapes: Path, tmp_path: Path) -> None:
    cfg = load_recipe(BENCH, [f"data.root={tiny_shapes}", f"output_dir={tmp_path}"])
    variants = build_variants(cfg)
    full, skip = variants["full"].module.model, variants["skip_vision"].module.model
    for (name, a), (_, b) in zip(full.backbone.named_parameters(), skip.backbone.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(full.encoder.model.pos_embed, skip.encoder.model.pos_embed)
    shape = LLMShape.from_config(full.backbone.config)
    schedule = model_schedule(variants["fastv"].module.model, 30 - 16)  # 8 of the 16 slots dropped from layer 1
    assert schedule.layers == (LayerTokens(30, 30, scored=30),) + (LayerTokens(22, 22),) * (shape.layers - 1)
    assert prefill_flops(shape, schedule) < prefill_flops(shape, TokenSchedule.full(shape.layers, 14, 16))


def test_bad_bench_settings_are_clear_errors(tiny_shapes: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(RecipeError, match=r"bench.baseline='nope' is not a variant; variants: \['fastv', 'full'"):
        variant_recipes(load_recipe(BENCH, ["bench.baseline=nope"]))
    argv = ["bench", "--recipe", str(BENCH), f"data.root={tiny_shapes}", f"output_dir={tmp_path}"]
    assert main([*argv, "--checkpoint", "full"]) == 2
    assert "is not of the form VARIANT=PATH" in capsys.readouterr().err
    assert main([*argv, "--checkpoint", f"nope={BENCH}"]) == 2
    assert "--checkpoint for unknown variant(s) ['nope']" in capsys.readouterr().err


def test_profile_names_the_skip_machinery(tiny_shapes: Path, tmp_path: Path) -> None:
    argv = ["bench", "--recipe", str(BENCH), "--profile", f"data.root={tiny_shapes}", f"output_dir={tmp_path}"]
    assert main(argv) == 0
    sections = (tmp_path / "profile.txt").read_text().split("== ")[1:]
    blocks = {name: "".join(b for b in sections if b.startswith(f"{name}: ")) for name in VARIANTS}
    for name in VARIANTS:
        assert f"{name}: training step" in blocks[name] and f"{name}: prefill + first token" in blocks[name]
    for label in ("policy_split", "merge", "summaries", "skip_ffn_gather", "skip_ffn_scatter", "kv_removal"):
        assert f"skipvision::{label}" in blocks["skip_vision"]
    assert "skipvision::merge" in blocks["merge_only"] and "skipvision::skip_ffn" not in blocks["merge_only"]
    assert "skipvision::fastv_score" in blocks["fastv"] and "skipvision::fastv_prune" in blocks["fastv"]
    assert "skipvision::pyramiddrop_score" in blocks["pyramid_drop"] and "pyramiddrop_prune" in blocks["pyramid_drop"]
    assert "skipvision::mod_router_route" in blocks["mod_router"] and "skip_ffn_gather" in blocks["mod_router"]
    assert "skipvision::" not in blocks["full"]


PEERS = ("fastv", "pyramid_drop", "mod_router", "mod_router_layer")  # every image token reaches the LLM


@pytest.mark.parametrize(
    ("recipe", "slots"),
    [
        ("bench-llava", {"full": 576, "skip_vision": 258, "merge_only": 258, **dict.fromkeys(PEERS, 576)}),
        # bench-hd inherits bench-llava's variants and sets its own Skip-Vision, merge_only and fastv
        ("bench-hd", {"full": 1728, "skip_vision": 1154, "merge_only": 1154, **dict.fromkeys(PEERS, 1728)}),
    ],
)
def test_shipped_bench_recipes_resolve_to_their_token_plans(recipe: str, slots: dict) -> None:
    """Built on the meta device (no weights), every variant of the shipped bench recipes has its token plan."""
    cfg = load_recipe(recipe)
    assert list(cfg.bench.variants) == list(slots)
    for name, overrides in cfg.bench.variants.items():
        model = build_meta_model(recipe, list(overrides))
        assert model.num_image_tokens == slots[name], name
        if name == "skip_vision":
            want = (100, 156) if recipe == "bench-llava" else (576, 576)
            assert (model.visual.layout.retained, model.visual.layout.skipped) == want
