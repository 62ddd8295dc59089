"""Chat templates: the tokenizer's own, or a named fallback for tokenizers without one, kept here
(docs/checkpoints.md "Chat templates").

Conversations are always rendered with transformers' ``apply_chat_template`` (Jinja), so a ChatML (Qwen2), Llama-3 or
Gemma tokenizer formats its turns exactly as its model was trained. Tokenizers that carry no template get one of
:data:`FALLBACKS` (``data.chat_template`` in the recipe; the run saves it with the tokenizer, so generation renders
the same way):

- ``skipvision_v1``: skipvision's LLaVA-v1-style layout, one line per turn (the synthetic shapes data)::

      <s>USER: <image>\\nWhat colour is the circle?\\nASSISTANT: red</s>\\nUSER: ...

- ``llava_v1``: LLaVA-1.5's Vicuna v1 layout with its default system prompt::

      <s>A chat between ... questions. USER: <image>\\nWhat is it? ASSISTANT: a cat</s>USER: ...
"""

from __future__ import annotations

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from skipvision.errors import SkipvisionError

LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
FALLBACKS = {
    "skipvision_v1": (
        "{{ bos_token }}"
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] }}{{ '\n' }}"
        "{% elif m['role'] == 'user' %}"
        "{% if not loop.first and messages[loop.index0 - 1]['role'] != 'system' %}{{ '\n' }}{% endif %}"
        "USER: {{ m['content'] }}{{ '\n' }}ASSISTANT:"
        "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "llava_v1": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
        "{% else %}" + LLAVA_SYSTEM + "{% endif %} "
        "{% for m in messages %}"
        "{% if m['role'] == 'user' %}USER: {{ m['content'] }} ASSISTANT:"
        "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}
DEFAULT_FALLBACK = "skipvision_v1"
AUTO = "auto"  # the tokenizer's own template, else the default fallback


class ChatTemplateError(SkipvisionError, ValueError):
    """An unknown template name, or a template that does not render the assistant's turns as needed."""


def apply_template(
    tokenizer: PreTrainedTokenizerBase, choice: str = AUTO, system: str | None = None
) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` the template ``choice`` names (``auto``, a name of :data:`FALLBACKS`, or ``tokenizer``:
    its own, which must exist), check it with the run's ``system`` prompt, and return it; the run saves it with the
    tokenizer."""
    if choice == AUTO:
        choice = "tokenizer" if tokenizer.chat_template else DEFAULT_FALLBACK
    if choice == "tokenizer":
        if not tokenizer.chat_template:
            raise ChatTemplateError(
                f"data.chat_template=tokenizer, but the tokenizer has no chat template; valid fallbacks: "
                f"{', '.join(FALLBACKS)}"
            )
    elif choice in FALLBACKS:
        tokenizer.chat_template = FALLBACKS[choice]
    else:
        valid = ", ".join([AUTO, "tokenizer", *FALLBACKS])
        raise ChatTemplateError(f"Recipe key 'data.chat_template' is {choice!r}; valid values: {valid}")
    check_template(tokenizer, system)
    return tokenizer


def check_template(tokenizer: PreTrainedTokenizerBase, system: str | None = None) -> None:
    """Fail at startup, not on every sample, when the template cannot supervise answers: with the run's system
    prompt, it must render two turns, each assistant turn's content verbatim after the generation prompt of the turns
    before it and closed by a special token."""
    probe = [] if system is None else [{"role": "system", "content": system}]
    probe += [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": "Answer."}] * 2
    try:
        full = render(tokenizer, probe)
        for i in (len(probe) - 3, len(probe) - 1):
            prefix, turn = render(tokenizer, probe[:i], generation_prompt=True), render(tokenizer, probe[: i + 1])
            answer = full.find("Answer.", len(prefix), len(turn))
            if not full.startswith(prefix) or answer < 0 or end_of_turn(tokenizer, turn[answer + 7 :]) is None:
                raise ChatTemplateError(
                    "the chat template does not render the assistant's turns after its generation prompt, closed by "
                    "a special token, so answers cannot be supervised; choose data.chat_template=skipvision_v1 or "
                    "llava_v1"
                )
    except TemplateError as err:  # the template's own refusal, e.g. Gemma's "System role not supported"
        raise ChatTemplateError(f"the chat template cannot render a conversation: {err}") from None


def template_of(tokenizer: PreTrainedTokenizerBase) -> str:
    """The template conversations are rendered with: the tokenizer's, else the default fallback."""
    return tokenizer.chat_template or FALLBACKS[DEFAULT_FALLBACK]


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    """``messages`` ([{role, content}]) as the template writes them; with ``generation_prompt``, ready for the
    assistant's next turn."""
    return tokenizer.apply_chat_template(
        messages, chat_template=template_of(tokenizer), tokenize=False, add_generation_prompt=generation_prompt
    )


def special_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tokenizer's special tokens as text (end-of-turn markers among them), longest first."""
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    return sorted(set(tokenizer.all_special_tokens) | set(added), key=len, reverse=True)


def end_of_turn(tokenizer: PreTrainedTokenizerBase, after: str) -> int | None:
    """Where the special token that ends an assistant turn ends in ``after`` (the rendering past the turn's
    content), or None when the template closes the turn with none."""
    hits = [(after.find(s), s) for s in special_strings(tokenizer) if after.find(s) >= 0]
    if not hits:
        return None
    start, token = min(hits, key=lambda h: (h[0], -len(h[1])))
    return start + len(token)


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end the assistant's turn: EOS and the template's own end-of-turn token (``<|im_end|>``,
    ``<|eot_id|>``, ...); generation stops on any of them."""
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    prefix = render(tokenizer, probe[:1], generation_prompt=True)
    full = render(tokenizer, probe)
    after = full[len(prefix) :]
    after = after[after.find("y") + 1 :]
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    end = end_of_turn(tokenizer, after)
    if end is not None:
        token = next(s for s in special_strings(tokenizer) if after[:end].endswith(s))
        ids.append(tokenizer.convert_tokens_to_ids(token))
    return sorted(set(ids))
