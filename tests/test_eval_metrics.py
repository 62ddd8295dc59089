"""The benchmarks' metrics against hand-computed cases (docs/evaluation.md "Metrics"): VQA's answer normalisation and
soft accuracy, MMBench-style letter extraction, POPE's yes/no reading and counts, exact match, caption scores, and
the per-category breakdown."""

from __future__ import annotations

import math

import pytest

from skipvision.eval.data import EvalItem
from skipvision.eval.metrics import (
    caption_metrics,
    choice_letter,
    exact_match,
    normalise_exact,
    normalise_vqa,
    option_letters,
    pope_answer,
    vqa_accuracy,
    yesno_metrics,
)
from skipvision.eval.scoring import score


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two.", "2"),  # the final period goes, then the number word becomes a digit
        ("a dog", "dog"),  # articles dropped
        ("The Dog", "dog"),
        ("an apple", "apple"),
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("2.", "2"),
        (".5", ".5"),
        ("yes!", "yes"),  # "!" not next to a space: a space, then stripped
        ("isnt", "isn't"),  # contractions missing their apostrophe are restored
        ("dont", "don't"),
        ("couldnt've", "couldn't've"),
        ("yall'll", "y'all'll"),
        ("im", "im"),  # the evaluator's first-person entries are capitalised and never match: kept as is
        ("what's", "what's"),  # the apostrophe is not punctuation
        ("1,000", "1000"),  # digit-comma-digit: every mark is deleted, not spaced
        ("1,000 people", "1000 people"),
        ("1,000-2", "10002"),
        ("10-2", "10 2"),  # no digit-comma-digit: the hyphen becomes a space
        ("red,blue", "red blue"),
        ("red, blue", "red blue"),  # next to a space: deleted
        ("x - y", "x y"),
        ("none", "0"),
        ("Ten", "10"),
        ("eleven", "eleven"),  # only zero to ten (and none)
        ("  Hello\tworld\n", "hello world"),
    ],
)
def test_vqa_normalisation_edge_cases(raw: str, normalised: str) -> None:
    assert normalise_vqa(raw) == normalised


@pytest.mark.parametrize(("matching", "accuracy"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_averages_min_one_third_over_the_ten_leave_one_out_subsets(matching: int, accuracy: float) -> None:
    """m humans agree with the prediction: the m subsets without one of them see m-1 matches, the other 10-m see m;
    e.g. m=3: (3 * 2/3 + 7 * 1) / 10 = 0.9, m=1: (1 * 0 + 9 * 1/3) / 10 = 0.3."""
    answers = ["cat"] * matching + ["dog"] * (10 - matching)
    assert vqa_accuracy("cat", answers) == pytest.approx(accuracy)


def test_vqa_accuracy_normalises_prediction_and_humans() -> None:
    answers = ["Two", "2", "two."] + ["3"] * 7  # three humans said 2, each written differently
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("There are 2.", answers) == 0.0  # normalisation is not answer extraction


def test_vqa_accuracy_with_one_answer_is_exact_match_after_normalisation() -> None:
    assert vqa_accuracy("Two.", ["2"]) == 1.0
    assert vqa_accuracy("a dog", ["the dog"]) == 1.0
    assert vqa_accuracy("3", ["2"]) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("2", [])


OPTIONS = {"A": "cat", "B": "dog", "C": "red fish"}


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("B)", "B"),
        ("[B]", "B"),
        ("The answer is B", "B"),
        ("The answer is B.", "B"),
        ("Answer: B", "B"),
        ("B. dog", "B"),
        ("dog", "B"),  # the option's text
        ("It is a Dog.", "B"),  # text match ignores case
        ("red fish", "C"),
        ("A or B", None),  # two letters and no option text: unparsed
        ("cats and dogs", None),  # two option texts
        ("E", None),  # not an option
        ("b", None),  # letters are capitals
        ("", None),
    ],
)
def test_choice_letter_extraction(prediction: str, letter: str | None) -> None:
    assert choice_letter(prediction, OPTIONS) == letter


def test_options_are_lettered_in_order_or_keyed_by_capitals() -> None:
    assert option_letters(["cat", "dog"]) == {"A": "cat", "B": "dog"}
    assert option_letters({"B": "dog", "D": 4}) == {"B": "dog", "D": "4"}
    with pytest.raises(ValueError, match="single capital letters"):
        option_letters({"a": "cat"})


@pytest.mark.parametrize(
    ("prediction", "said"),
    [
        ("Yes", "yes"),
        ("yes", "yes"),
        ("Yes, there is a dog.", "yes"),
        ("No", "no"),
        ("No, there is not.", "no"),
        ("no", "no"),
        ("There is no dog in the image.", "no"),
        ("The dog is not visible", "no"),
        ("Yes. But there is no cat.", "yes"),  # only the first sentence counts
        ("I see a cat. No dog.", "yes"),
        ("No, there is none", "no"),
        ("No,there is none", "yes"),  # commas are dropped before splitting: "Nothere" is not "No"
        ("NO", "yes"),  # POPE's words are exactly "no", "No" and "not"
        ("Nope", "yes"),
        ("", "yes"),  # an answer that says neither counts as yes
        ("no\nthere is none", "no"),  # any whitespace separates words here
    ],
)
def test_pope_reads_yes_unless_the_first_sentence_has_no_or_not(prediction: str, said: str) -> None:
    assert pope_answer(prediction) == said


def test_pope_counts_precision_recall_f1_and_yes_ratio() -> None:
    predicted = ["yes", "yes", "yes", "yes", "no"]
    labels = ["yes", "no", "no", "yes", "yes"]  # TP 2 (1st, 4th), FP 2 (2nd, 3rd), FN 1 (5th), TN 0
    metrics = yesno_metrics(predicted, labels)
    assert (metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"]) == (2, 2, 0, 1)
    assert metrics["accuracy"] == pytest.approx(2 / 5)
    assert metrics["precision"] == pytest.approx(2 / 4)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(4 / 7)  # 2 * 1/2 * 2/3 / (1/2 + 2/3)
    assert metrics["yes_ratio"] == pytest.approx(4 / 5)
    none_yes = yesno_metrics(["no", "no"], ["yes", "no"])
    assert none_yes["precision"] == 0.0 and none_yes["f1"] == 0.0 and none_yes["accuracy"] == 0.5


@pytest.mark.parametrize(
    ("prediction", "correct"),
    [("red", 1.0), ("Red.", 1.0), ("  RED  ", 1.0), ("red!", 1.0), ("red circle", 0.0), (".red", 0.0), ("blue", 1.0)],
)
def test_exact_match_ignores_case_surrounding_space_and_final_punctuation(prediction: str, correct: float) -> None:
    assert exact_match(prediction, ["red", "blue"]) == correct
    assert normalise_exact("Red.!") == "red"


def test_caption_bleu4_with_brevity_penalty_and_chrf() -> None:
    # Every n-gram of the 5-token prediction is in the 6-token reference: BLEU-4 is the brevity penalty exp(1 - 6/5).
    metrics, sentence = caption_metrics(["A red circle on the"], [["a red circle on the left"]])
    assert metrics["bleu4"] == pytest.approx(math.exp(1 - 6 / 5), abs=1e-6)
    assert 0 < metrics["chrf"] < 1 and sentence == [pytest.approx(metrics["chrf"])]  # one sentence: the corpus
    same, _ = caption_metrics(["A Red Circle."], [["a blue square.", "a red circle."]])  # best reference, lower case
    assert same == {"bleu4": pytest.approx(0.0), "chrf": pytest.approx(1.0)}  # 3 tokens: no 4-gram to match
    disjoint, _ = caption_metrics(["xyz"], [["abc"]])
    assert disjoint == {"bleu4": 0.0, "chrf": 0.0}


def _item(index: int, answer: str, category: str | None, **fields: object) -> EvalItem:
    return EvalItem(id=str(index), question="q", answer=answer, category=category, **fields)


def test_vqa_breakdown_per_category() -> None:
    humans = ("2",) * 1 + ("3",) * 9  # "2" matches one human: 0.3
    items = [
        _item(0, "red", "colour"),
        _item(1, "2", "count", answers=humans),
        _item(2, "blue", "colour"),
        _item(3, "cat", None),  # no category: counted in overall only
    ]
    scored = score("vqa", items, ["Red.", "two", "green", "a cat"])
    assert [s.score for s in scored.items] == [1.0, pytest.approx(0.3), 0.0, 1.0]
    assert scored.overall == {"accuracy": pytest.approx(2.3 / 4), "count": 4}
    assert scored.categories == {
        "colour": {"accuracy": 0.5, "count": 2},
        "count": {"accuracy": pytest.approx(0.3), "count": 1},
    }


def test_choice_breakdown_counts_unparsed_answers_as_wrong() -> None:
    items = [_item(i, "B", "x" if i < 2 else "y", options=OPTIONS) for i in range(4)]
    scored = score("choice", items, ["(B)", "A or B", "dog", "A"])
    assert [s.parsed for s in scored.items] == ["B", None, "B", "A"]
    assert scored.overall == {"accuracy": 0.5, "unparsed": 1, "count": 4}
    assert scored.categories["x"] == {"accuracy": 0.5, "unparsed": 1, "count": 2}
    assert scored.categories["y"] == {"accuracy": 0.5, "unparsed": 0, "count": 2}


def test_yesno_breakdown_per_category() -> None:
    labels = ["yes", "no", "no", "yes"]
    items = [_item(i, label, "random" if i < 2 else "adversarial") for i, label in enumerate(labels)]
    scored = score("yesno", items, ["Yes, it is.", "There is no dog.", "Yes", "not at all"])
    assert [s.parsed for s in scored.items] == ["yes", "no", "yes", "no"]
    assert scored.categories["random"]["accuracy"] == 1.0 and scored.categories["random"]["f1"] == 1.0
    adversarial = scored.categories["adversarial"]  # one FP, one FN
    assert (adversarial["fp"], adversarial["fn"], adversarial["precision"], adversarial["yes_ratio"]) == (1, 1, 0, 0.5)
    assert scored.overall["accuracy"] == 0.5 and scored.overall["count"] == 4


def test_caption_scores_are_corpus_metrics_per_category() -> None:
    items = [_item(0, "a red circle on the left", "a"), _item(1, "two blue squares", "b")]
    scored = score("caption", items, ["a red circle on the", "xyz"])
    assert scored.categories["a"]["bleu4"] == pytest.approx(math.exp(1 - 6 / 5), abs=1e-6)
    assert scored.categories["b"]["chrf"] == 0.0 and scored.items[1].score == 0.0
    overall, _ = caption_metrics(["a red circle on the", "xyz"], [["a red circle on the left"], ["two blue squares"]])
    assert scored.overall == {**overall, "count": 2}
