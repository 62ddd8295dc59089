"""End to end through the CLI: fit on tiny shards, checkpoints with their recipe, resume, validate; optimiser."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from skipvision.cli import main
from skipvision.data.chat import encode_conversation
from skipvision.data.templates import FALLBACKS
from skipvision.data.tokenizer import load_tokenizer
from skipvision.inference import Request, VLMGenerator
from skipvision.lit.module import VLMLitModule, warmup_cosine
from skipvision.lit.run import build, build_trainer, validate
from skipvision.recipe import load_recipe

from .conftest import TINY_RECIPE


def _fit(overrides: list[str]) -> int:
    return main(["fit", "--recipe", str(TINY_RECIPE), *overrides])


def _ckpt(run: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=False)


def test_cli_fit_two_steps_writes_checkpoint_recipe_and_logs(tiny_overrides: list[str], tmp_path: Path) -> None:
    assert _fit(tiny_overrides) == 0
    run = tmp_path / "run"
    ckpt = _ckpt(run)
    assert ckpt["global_step"] == 2
    saved = yaml.safe_load((run / "checkpoints" / "recipe.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 2 and saved["output_dir"] == str(run)
    assert ckpt["hyper_parameters"]["recipe"] == saved  # the recipe also travels inside the checkpoint
    assert (run / "checkpoints" / "step=2.ckpt").is_file()
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    rows = list(csv.DictReader(open(run / "logs" / "version_0" / "metrics.csv")))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"train/loss", "val/loss", "val/acc_all", "tok/s"} <= logged
    val = [r for r in rows if r["val/acc_all"]][-1]
    assert 0.0 <= float(val["val/acc_all"]) <= 1.0 and float(val["val/loss"]) > 0


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["trainer.precision=bf16-mixed"], "precision"),
        (["trainer.logger=tensorboard"], "tensorboard"),
        (["trainer.accumulate_grad_batches=2"], "accumulate"),
    ],
)
def test_precision_logger_and_accumulation_options(
    tiny_overrides: list[str], tmp_path: Path, extra: list[str], expect: str
) -> None:
    assert _fit([*tiny_overrides, *extra]) == 0
    run = tmp_path / "run"
    ckpt = _ckpt(run)
    assert ckpt["global_step"] == 2
    if expect == "precision":
        cfg = load_recipe(TINY_RECIPE, [*tiny_overrides, *extra])
        module, datamodule, _ = build(cfg)
        trainer = build_trainer(cfg, tmp_path / "other")
        assert trainer.precision == "bf16-mixed"
        batch = next(iter(datamodule.train_dataloader()))
        with trainer.precision_plugin.forward_context():
            assert module(batch).logits.dtype == torch.bfloat16  # the backbone really runs in bf16 autocast
    elif expect == "tensorboard":
        assert list((run / "logs").glob("version_0/events.out.tfevents.*"))
    else:
        # two optimizer steps from four batches: the Adam step count still says 2
        assert ckpt["optimizer_states"][0]["state"][0]["step"] == 2
        assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["ready"] == 4


def test_resume_continues_step_count_and_optimizer_state(tiny_overrides: list[str], tmp_path: Path) -> None:
    assert _fit(tiny_overrides) == 0
    run = tmp_path / "run"
    first = _ckpt(run)
    assert first["optimizer_states"][0]["state"][0]["step"] == 2
    assert _fit([*tiny_overrides, "trainer.max_steps=4", "checkpoint.resume=last"]) == 0
    resumed = _ckpt(run)
    assert resumed["global_step"] == 4
    assert resumed["optimizer_states"][0]["state"][0]["step"] == 4  # Adam moments continued, not restarted
    assert resumed["lr_schedulers"][0]["last_epoch"] == 4
    assert (run / "checkpoints" / "step=4.ckpt").is_file()


def test_fit_generates_missing_data_and_refuses_mismatched_data(tmp_path: Path, capsys) -> None:
    root = tmp_path / "fresh"
    small = [f"data.root={root}", f"output_dir={tmp_path / 'run'}", "data.shapes.num_train=8", "data.shapes.num_val=8"]
    assert _fit([*small, "trainer.max_steps=1"]) == 0
    meta = json.loads((root / "meta.json").read_text())
    assert meta["num_train"] == 8 and meta["train_questions"] == 2
    assert _fit([*small, "data.shapes.num_train=9", f"output_dir={tmp_path / 'run2'}"]) == 2
    err = capsys.readouterr().err
    assert "holds a shapes dataset generated with other settings (num_train: 8 on disk, 9 in the recipe)" in err
    absent = [f"data.root={tmp_path / 'absent'}", f"output_dir={tmp_path / 'run3'}"]
    assert _fit([*small, "data.shapes.generate=false", *absent]) == 2
    assert "data.shapes.generate is false" in capsys.readouterr().err


def test_unknown_component_in_a_recipe_fails_before_training(tiny_overrides: list[str], capsys) -> None:
    assert _fit([*tiny_overrides, "model.projector=mlp3x_gelu"]) == 2
    err = capsys.readouterr().err
    assert "Unknown projector 'mlp3x_gelu'. Did you mean: mlp2x_gelu?" in err
    assert "Registered projectors: linear, mlp2x_gelu." in err


def test_resume_without_a_checkpoint_is_a_clear_error(tiny_overrides: list[str], capsys) -> None:
    assert _fit([*tiny_overrides, "checkpoint.resume=last"]) == 2
    assert "checkpoint.resume='last': no checkpoint at" in capsys.readouterr().err


def test_validate_reports_accuracy_of_a_checkpoint(tiny_overrides: list[str], tmp_path: Path, capsys) -> None:
    assert _fit(tiny_overrides) == 0
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    cfg = load_recipe(TINY_RECIPE, tiny_overrides)
    from skipvision.lit.run import validate

    (metrics,) = validate(cfg, ckpt)
    assert {"val/loss", "val/acc_all"} <= set(metrics)
    assert main(["validate", "--recipe", str(TINY_RECIPE), "--checkpoint", "nope.ckpt", *tiny_overrides]) == 2
    assert "No checkpoint at nope.ckpt" in capsys.readouterr().err


def test_freeze_flags_and_per_component_learning_rates(tiny_overrides: list[str]) -> None:
    cfg = load_recipe(TINY_RECIPE, [*tiny_overrides, "optim.freeze_encoder=true", "optim.lr_projector=0.01"])
    module, _, _ = build(cfg)
    assert not any(p.requires_grad for p in module.model.encoder.parameters())
    groups = {g["name"]: g for g in module.configure_optimizers()["optimizer"].param_groups}
    assert set(groups) == {"projector", "llm"}
    assert groups["projector"]["initial_lr"] == 0.01
    assert groups["llm"]["initial_lr"] == cfg.optim.lr
    assert sum(p.numel() for p in groups["llm"]["params"]) == sum(p.numel() for p in module.model.backbone.parameters())


def test_warmup_then_cosine_schedule() -> None:
    f = warmup_cosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.55)
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_module_hyperparameters_rebuild_the_same_model(tiny_overrides: list[str]) -> None:
    cfg = load_recipe(TINY_RECIPE, tiny_overrides)
    module, _, _ = build(cfg)
    clone = VLMLitModule(**module.hparams)
    assert clone.model.num_image_tokens == module.model.num_image_tokens == 16
    assert {k: v.shape for k, v in clone.state_dict().items()} == {k: v.shape for k, v in module.state_dict().items()}


def test_activation_checkpointing_switch_recomputes_with_the_same_gradients(tiny_overrides: list[str]) -> None:
    """``trainer.activation_checkpointing`` turns on transformers' (non-reentrant) checkpointing of the decoder
    layers in ``configure_model``: layer forwards run again in backward, and loss and gradients stay the same."""
    plain, checkpointed = (
        build(load_recipe(TINY_RECIPE, [*tiny_overrides, f"trainer.activation_checkpointing={on}"]))[0]
        for on in ("false", "true")
    )
    batch = next(iter(build(load_recipe(TINY_RECIPE, tiny_overrides))[1].train_dataloader()))
    results = []
    for module in (plain, checkpointed):
        module.configure_model()
        module.train()
        calls = []
        mlp = module.model.backbone.model.layers[0].mlp
        mlp.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        loss = module(batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in module.named_parameters()}, len(calls)))
    (loss0, grads0, calls0), (loss1, grads1, calls1) = results
    assert (
        checkpointed.model.backbone.is_activation_checkpointing and not plain.model.backbone.is_activation_checkpointing
    )
    assert (calls0, calls1) == (1, 2)  # the checkpointed layer ran again in backward (hooks inside it see it)
    assert torch.equal(loss0, loss1)
    for name, grad in grads0.items():
        torch.testing.assert_close(grads1[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_undeclared_question_types_count_in_all_only(
    tiny_overrides: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Declared up front (docs/distributed.md "SPMD"): with only ``colour`` declared, the other types' samples still
    count in ``val/acc_all`` and the loss, with one warning per undeclared type; nothing is dropped."""
    assert _fit(tiny_overrides) == 0
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    whole = [*tiny_overrides, "trainer.limit_val_batches=null"]
    (declared,) = validate(load_recipe(TINY_RECIPE, whole), ckpt)
    (colour_only,) = validate(load_recipe(TINY_RECIPE, [*whole, "eval.question_types=[colour]"]), ckpt)
    assert {k for k in colour_only if k.startswith("val/acc")} == {"val/acc_all", "val/acc_colour"}
    assert {k for k in declared if k.startswith("val/acc_")} > {"val/acc_all", "val/acc_colour"}
    for key in ("val/loss", "val/acc_all", "val/acc_colour", "val/data_skipped"):
        assert colour_only[key] == pytest.approx(declared[key]), key
    warned = [r.getMessage() for r in caplog.records if "is not declared" in r.getMessage()]
    assert warned and all("it counts in val/acc_all only" in w for w in warned)


def test_the_run_keeps_its_chat_template_and_system_prompt_for_generate(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    """docs/checkpoints.md "Chat templates": the template is saved with the run's tokenizer and the system prompt with
    its recipe, and generate renders prompts with both, exactly as training rendered the samples."""
    assert _fit([*tiny_overrides, "data.system_prompt=Answer in one word."]) == 0
    run = tmp_path / "run"
    saved = load_tokenizer(run / "tokenizer")
    assert saved.chat_template == FALLBACKS["skipvision_v1"]
    generator = VLMGenerator.from_checkpoint(run)
    (encoded,) = generator.encode([Request("What colour is the circle?")])
    image_id = saved.convert_tokens_to_ids("<image>")
    turns = [{"from": "human", "value": "What colour is the circle?"}, {"from": "gpt", "value": "red"}]
    sample = encode_conversation(saved, turns, generator.model.num_image_tokens, 0, image_id, "Answer in one word.")
    assert encoded.ids == sample.input_ids[: sample.prompt_length]
    assert saved.decode(encoded.ids).startswith("<s>Answer in one word.\nUSER: What colour")
