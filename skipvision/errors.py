"""The one base class of every error a user can cause (docs/cli.md "Errors").

The CLI catches :class:`SkipvisionError` and prints its message as one line with exit status 2; anything else is
a bug and keeps its traceback. Subclasses also derive from the built-in exception that fits (``ValueError``,
``FileNotFoundError``, ...), so library callers can catch either.
"""

from __future__ import annotations


class SkipvisionError(Exception):
    """Bad input from the user: a recipe, a name, a file, a request. Its message is one line naming the problem
    and the valid choices."""


class UnsupportedModelError(SkipvisionError, ValueError):
    """A model family (HF ``model_type``) that has no decoder adapter, or a feature a family does not support."""


class MethodError(SkipvisionError, ValueError):
    """A token-skipping method's settings that cannot work: a bad argument, or one this model cannot run (a drop
    layer beyond its depth, a Skip-FFN layer out of range, whole-layer routing on a sliding-window family)."""


class MissingFileError(SkipvisionError, FileNotFoundError):
    """A file or folder the user named (a checkpoint, a tokenizer, a requests file, an image) does not exist."""


class OutputExistsError(SkipvisionError, FileExistsError):
    """An output folder the user named already holds data that the command would overwrite."""


class DataError(SkipvisionError, RuntimeError):
    """A sample or shard could not be used; the message names the file and the sample (raised by the loader,
    skipvision/data/pipeline.py, which re-exports it, and by ``data llava`` for input changed since its check)."""
