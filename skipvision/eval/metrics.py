"""The benchmarks' metrics as small pure functions on strings (docs/evaluation.md "Metrics").

- VQA soft accuracy with the VQA evaluator's answer normalisation (:func:`normalise_vqa`, :func:`vqa_accuracy`);
- multiple-choice letter extraction by MMBench's rules before its LLM judge (VLMEvalKit's ``can_infer_option``, then
  ``can_infer_text``: :func:`choice_letter`); not ScienceQA's reading in LLaVA and lmms-eval, which differs;
- POPE's yes/no reading of a free-form answer and its binary metrics (:func:`pope_answer`, :func:`yesno_metrics`);
- exact match after light normalisation (:func:`normalise_exact`);
- corpus BLEU-4 and chrF++ of captions through torchmetrics (:func:`caption_metrics`).

Written from the benchmarks' definitions; each rule, and where it differs from a reference script, is in
docs/evaluation.md. Nothing here imports torch except :func:`caption_metrics` (the CLI's parser stays torch-free).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence

# --- VQA ---------------------------------------------------------------------------------------------------------

# Marks the evaluator deletes or turns into a space; the period and the apostrophe are not among them.
VQA_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its period, "2." loses it)
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
# English contractions the evaluator restores when a word is one of them with one apostrophe missing.
CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've needn't not've
o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd somebody'd've somebody'll
somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd
there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll
what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't
would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _missing_one_apostrophe(word: str) -> list[str]:
    """``word`` with each one of its apostrophes removed: "couldn't've" -> ["couldnt've", "couldn'tve"]."""
    return [word[:i] + word[i + 1 :] for i, char in enumerate(word) if char == "'"]


RESTORED = {short: word for word in CONTRACTIONS for short in _missing_one_apostrophe(word)}


def vqa_punctuation(text: str) -> str:
    """The evaluator's punctuation step. Each mark of :data:`VQA_PUNCTUATION` is deleted when the text has it next
    to a space, or when the text holds a digit-comma-digit anywhere ("1,000"); otherwise it becomes a space
    ("red,blue" -> "red blue"). Both tests read the text as given, not as the earlier marks left it. Then every
    period not followed by a digit is deleted."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in VQA_PUNCTUATION:
        delete = delete_all or f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete else " ")
    return _PERIOD.sub("", out)


def normalise_vqa(text: str) -> str:
    """An answer as the VQA evaluator compares it: newlines and tabs as spaces, surrounding space stripped, the
    punctuation step (:func:`vqa_punctuation`), lower case, number words up to ten as digits ("none" is "0"),
    articles dropped, contractions missing one apostrophe restored ("dont" -> "don't"), words joined by one space."""
    text = vqa_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(RESTORED.get(word, word) for word in words if word not in ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against the human answers (usually 10): for each human left out in turn,
    min(1, matches among the others / 3), averaged; prediction and answers normalised by :func:`normalise_vqa`.
    With fewer than two answers it is exact match after normalisation (leaving the one answer out leaves none)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    predicted = normalise_vqa(prediction)
    matches = [normalise_vqa(answer) == predicted for answer in answers]
    if len(answers) < 2:
        return float(matches[0])
    hits = sum(matches)
    return sum(min(1.0, (hits - left_out) / 3) for left_out in matches) / len(matches)


# --- multiple choice -----------------------------------------------------------------------------------------------

_CHOICE_SEPARATORS = str.maketrans({char: " " for char in ".()[],:;!*#{}"})


def option_letters(choices: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """Options as {letter: text}: a list is lettered A, B, C, ... in order; a mapping must be keyed by capitals."""
    if isinstance(choices, Mapping):
        bad = [key for key in choices if key not in string.ascii_uppercase or len(key) != 1]
        if bad:
            raise ValueError(f"option keys must be single capital letters, got {bad}")
        return {key: str(text) for key, text in choices.items()}
    if len(choices) > len(string.ascii_uppercase):
        raise ValueError(f"at most {len(string.ascii_uppercase)} options, got {len(choices)}")
    return dict(zip(string.ascii_uppercase, map(str, choices), strict=False))


def choice_letter(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option a free-form answer picks, by MMBench's rules before its LLM judge (VLMEvalKit's
    ``can_infer_option``, then ``can_infer_text``, without their refusal phrases and option Z); None when it cannot
    tell.

    1. The letter: ``.()[],:;!*#{}`` become spaces and the text is split on whitespace; when exactly one option
       letter is among the words, it is the answer ("B", "B.", "(B)", "The answer is B", "B. a cat").
    2. Else the text: when exactly one option's text occurs in the answer (both lower-cased), its letter.
    """
    words = set(prediction.translate(_CHOICE_SEPARATORS).split())
    letters = [letter for letter in options if letter in words]
    if len(letters) == 1:
        return letters[0]
    answer = prediction.lower()
    named = [letter for letter, text in options.items() if text.strip() and text.strip().lower() in answer]
    return named[0] if len(named) == 1 else None


# --- yes/no (POPE) -------------------------------------------------------------------------------------------------


def pope_answer(prediction: str) -> str:
    """ "yes" or "no" as POPE reads an answer: only the text before the first period counts, commas are dropped, and
    the answer is "no" when one of its words is exactly "no", "No" or "not"; anything else, even an answer that
    says neither, is "yes". (POPE splits on single spaces; here any whitespace separates words.)"""
    first = prediction.split(".", 1)[0].replace(",", "")
    return "no" if {"no", "No", "not"} & set(first.split()) else "yes"


def yesno_metrics(predicted: Sequence[str], labels: Sequence[str]) -> dict[str, float | int]:
    """POPE's metrics with "yes" as the positive class: accuracy, precision, recall, F1 and the share of "yes"
    predictions, and the four counts. A ratio with a zero denominator is 0 (POPE's script divides by zero there)."""
    if len(predicted) != len(labels):
        raise ValueError(f"{len(predicted)} predictions for {len(labels)} labels")
    pairs = list(zip(predicted, labels, strict=True))
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    tn = sum(p == "no" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, len(pairs)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, len(pairs)),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


# --- exact match and captions --------------------------------------------------------------------------------------

_FINAL_PUNCTUATION = ".!?,;:"


def normalise_exact(text: str) -> str:
    """Lower case, surrounding whitespace and final punctuation (``.!?,;:``) removed: "Red." -> "red"."""
    return text.strip().rstrip(_FINAL_PUNCTUATION).strip().lower()


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals one of the normalised answers, else 0.0."""
    predicted = normalise_exact(prediction)
    return float(any(normalise_exact(answer) == predicted for answer in answers))


def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[dict, list[float]]:
    """Corpus BLEU-4 and chrF++ of ``predictions`` against their references, and each prediction's sentence chrF++.

    Both through torchmetrics on lower-cased text: ``bleu_score(n_gram=4)`` (whitespace tokens, no smoothing,
    n-gram counts and the brevity penalty summed over the corpus) and ``chrf_score`` with its defaults (character
    6-grams and word 2-grams, beta 2). Corpus scores are not the mean of sentence scores."""
    from torchmetrics.functional.text import bleu_score, chrf_score

    preds = [p.lower() for p in predictions]
    refs = [[r.lower() for r in rs] for rs in references]
    if not preds:
        return {"bleu4": 0.0, "chrf": 0.0}, []
    corpus_chrf, sentence_chrf = chrf_score(preds, refs, lowercase=True, return_sentence_level_score=True)
    metrics = {"bleu4": float(bleu_score(preds, refs, n_gram=4)), "chrf": float(corpus_chrf)}
    return metrics, [float(s) for s in sentence_chrf]
