"""The CLI's contract (docs/cli.md): --help and list load no torch, user errors are one line with exit status 2,
anything else keeps its traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from skipvision.cli import main
from skipvision.data.tokenizer import TokenizerError, load_tokenizer
from skipvision.errors import SkipvisionError
from skipvision.model import VisionLanguageModel
from skipvision.registry import REGISTRIES

from .conftest import TINY_RECIPE

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "lightning", "timm")

STARTUP_PROBE = """
import contextlib, io, sys
from skipvision.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main(["--help"])
    except SystemExit as exit:
        assert exit.code == 0
    assert main(["list"]) == 0
print(sorted(m for m in {heavy} if m in sys.modules))
"""


def test_help_and_list_import_no_torch() -> None:
    """What keeps them under a second (scripts/bench_cli_startup.py measures the time)."""
    probe = STARTUP_PROBE.format(heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"


def test_list_prints_names_descriptions_and_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "compressor"]) == 0
    assert capsys.readouterr().out == (
        "compressor\n"
        "  avg_pool     adaptive average pooling of the skip candidates to N_s tokens, in their given order\n"
        "  identity     no merge: the skip candidates unchanged\n"
        "  token_merge  bipartite mean merge of the skip candidates to N_s tokens, destinations in spatial order\n"
        "  presets: (none)\n"
    )
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    recipes = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    assert out.endswith(f"\n\nrecipes: {', '.join(recipes)}\n")
    for kind in REGISTRIES:
        presets = sorted(p.stem for p in (REPO / "registry" / kind).glob("*.yaml"))
        assert f"\n  presets: {', '.join(presets) or '(none)'}\n" in out.split(f"{kind}\n", 1)[1]


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.removesuffix("\n")


def test_unknown_recipe_name_lists_the_shipped_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["print-recipe", "--recipe", "shapes-tiyn"]) == 2
    shipped = ", ".join(sorted(p.stem for p in (REPO / "recipes").glob("*.yaml")))
    assert _error_line(capsys) == (
        "skipvision print-recipe: error: Recipe 'shapes-tiyn' not found: no such file, and no shipped recipe by that "
        f"name. Did you mean: shapes-tiny, shapes-tiny-full? Shipped recipes: {shipped}."
    )


@pytest.mark.parametrize(("strategy", "hint"), [("dpp", " Did you mean: ddp, fsdp?"), ("deepspeed_stage_3", "")])
def test_invalid_trainer_strategy_names_the_valid_ones(
    capsys: pytest.CaptureFixture[str], strategy: str, hint: str
) -> None:
    """Only the strategies skipvision runs and tests pass (docs/distributed.md "Strategies"); Lightning's other
    names (FSDP1, DeepSpeed, ...) fail before anything is built."""
    assert main(["fit", "--recipe", str(TINY_RECIPE), f"trainer.strategy={strategy}"]) == 2
    assert _error_line(capsys) == (
        f"skipvision fit: error: Recipe key 'trainer.strategy' is {strategy!r}.{hint} "
        "Valid values: auto, ddp, ddp_find_unused_parameters_true, fsdp, model_parallel."
    )


def _tokenizer_without_image_token(folder: Path) -> Path:
    words = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3, "red": 4, "circle": 5}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = {"unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
    PreTrainedTokenizerFast(tokenizer_object=backend, **specials).save_pretrained(folder)
    return folder


def test_a_tokenizer_without_image_token_gets_one(tiny_overrides: list[str], tmp_path: Path) -> None:
    """``fit`` adds ``<image>`` as a special token (docs/checkpoints.md "Chat templates") and saves the tokenizer
    with it; the Python API, given such a tokenizer directly, fails in one line instead."""
    folder = _tokenizer_without_image_token(tmp_path / "tokenizer")
    assert main(["fit", "--recipe", str(TINY_RECIPE), *tiny_overrides, f"data.tokenizer={folder}"]) == 0
    saved = load_tokenizer(tmp_path / "run" / "tokenizer")
    image_id = saved.convert_tokens_to_ids("<image>")
    assert image_id == len(saved) - 1 and saved.added_tokens_decoder[image_id].special
    with pytest.raises(TokenizerError, match="The tokenizer has no '<image>' token"):
        VisionLanguageModel.from_specs("timm", "mlp2x_gelu", "hf_causal_lm", load_tokenizer(folder))


def test_multi_line_messages_print_as_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """omegaconf's type errors span several lines; the CLI joins them."""
    assert main(["print-recipe", "--recipe", str(TINY_RECIPE), "trainer.max_steps=many"]) == 2
    line = _error_line(capsys)
    assert line.startswith("skipvision print-recipe: error: Invalid recipe value: Value 'many' of type 'str' could")
    assert "full_key: trainer.max_steps" in line


BUGGY_PLUGIN = """
    from torch import nn
    from skipvision.registry import PROJECTORS

    @PROJECTORS.register("buggy_projector")
    def build(in_dim: int, out_dim: int) -> nn.Module:
        '''A projector with a bug.'''
        raise RuntimeError("a bug, not a user error")
"""


def test_errors_that_are_not_user_errors_keep_their_traceback(tiny_overrides: list[str], tmp_path: Path) -> None:
    """In a fresh interpreter, so the buggy component stays out of this process's registries."""
    (tmp_path / "buggy_plugin.py").write_text(textwrap.dedent(BUGGY_PLUGIN))
    argv = ["fit", "--recipe", str(TINY_RECIPE), *tiny_overrides, "imports=[buggy_plugin]"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-m", "skipvision", *argv, "model.projector=buggy_projector"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 1
    assert "Traceback (most recent call last):" in done.stderr
    assert done.stderr.endswith("RuntimeError: a bug, not a user error\n")


@pytest.mark.parametrize(
    "error",
    [
        "skipvision.recipe.RecipeError",
        "skipvision.registry.RegistryError",
        "skipvision.data.pipeline.DataError",
        "skipvision.data.chat.ConversationError",
        "skipvision.model.ImageTokenMismatchError",
        "skipvision.data.tokenizer.TokenizerError",
        "skipvision.inference.generator.RequestError",
        "skipvision.inference.checkpoint.CheckpointError",
        "skipvision.inference.generate.PromptTooLongError",
        "skipvision.eval.data.EvalDataError",
        "skipvision.eval.cli.EvalArgumentError",
        "skipvision.errors.MissingFileError",
        "skipvision.errors.OutputExistsError",
    ],
)
def test_user_errors_share_one_base_and_keep_their_builtin_base(error: str) -> None:
    module, name = error.rsplit(".", 1)
    cls = getattr(__import__(module, fromlist=[name]), name)
    builtin = {
        "DataError": RuntimeError,
        "CheckpointError": FileNotFoundError,
        "MissingFileError": FileNotFoundError,
        "OutputExistsError": FileExistsError,
    }.get(name, ValueError)
    assert issubclass(cls, SkipvisionError) and issubclass(cls, builtin)
