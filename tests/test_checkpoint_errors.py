"""Bad checkpoints and tokenizers fail with one clear line each (docs/checkpoints.md "Strict loading"): a folder of
another architecture, a missing tokenizer, weights of the wrong shape, a template without assistant turns."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from skipvision.cli import main
from skipvision.data.templates import ChatTemplateError, apply_template
from skipvision.data.tokenizer import load_tokenizer

from .conftest import TINY_RECIPE, tiny_lm_config
from .test_llava_import import tiny_llava


@pytest.fixture(scope="module")
def tokenizer(tiny_shapes: Path):
    return load_tokenizer(tiny_shapes / "tokenizer")


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line (stderr also carries transformers' progress bars)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("skipvision ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_folder_of_another_architecture(tokenizer, tiny_overrides: list[str], tmp_path: Path, capsys) -> None:
    llama = tmp_path / "llama"
    AutoModelForCausalLM.from_config(tiny_lm_config(vocab_size=len(tokenizer))).save_pretrained(llama)
    assert (
        main(["fit", "--recipe", str(TINY_RECIPE), *tiny_overrides, f"model.encoder={{name: hf_clip, path: {llama}}}"])
        == 2
    )
    assert f"{llama} holds a 'llama' model, not a clip_vision_model (or clip, or llava) one" in error_line(capsys)
    assert main(["generate", "--checkpoint", str(llama), "--prompt", "hi"]) == 2
    assert "is incomplete, missing: weights" in error_line(capsys)


def test_a_llava_folder_without_tokenizer_or_with_wrong_shapes(tokenizer, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "llava"
    tiny_llava(tokenizer).save_pretrained(folder)
    assert main(["generate", "--checkpoint", str(folder), "--prompt", "hi"]) == 2
    assert f"no tokenizer found at {folder}" in error_line(capsys)

    tokenizer.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["multi_modal_projector.linear_2.weight"] = torch.zeros(64, 32)
    save_file(tensors, folder / "model.safetensors")
    assert main(["generate", "--checkpoint", str(folder), "--prompt", "hi"]) == 2
    assert "(projector) does not fit MLPProjector: 1 of the wrong shape (2.weight (64, 32) vs (64, 64))" in error_line(
        capsys
    )


def test_a_template_without_assistant_turns_fails_at_startup(tokenizer, tiny_overrides, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "tokenizer"
    tokenizer.save_pretrained(folder)
    user_only = "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\\n{% endif %}{% endfor %}"
    broken = load_tokenizer(folder)
    broken.chat_template = user_only
    with pytest.raises(ChatTemplateError, match="does not render the assistant's turns"):
        apply_template(broken, "tokenizer")
    broken.save_pretrained(folder)
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
    assert main(["fit", "--recipe", str(TINY_RECIPE), *tiny_overrides, f"data.tokenizer={folder}"]) == 2
    assert "the chat template does not render the assistant's turns" in error_line(capsys)
