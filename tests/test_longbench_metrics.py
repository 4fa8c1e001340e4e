"""LongBench's metrics against hand-computed values, including LongBench's quirks; oracles where installed."""

import random

import pytest

from enhance_long.tasks import longbench_metrics as m

# ROUGE-L F as rouge 1.0.1 writes it: 2 * (P * R / (P + R + 1e-8))


def rouge_f(precision: float, recall: float) -> float:
    return 2.0 * (precision * recall / (precision + recall + 1e-8))


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("the, Cat's", "cats"),  # punctuation goes first, so "the," is still an article
        ("Anna and Ian", "anna and ian"),  # articles only as whole words
        ("Cat’s “quote”", "cat’s “quote”"),  # only ASCII punctuation is removed
        ("1-2  \t a\nb", "12 b"),
        ("A", ""),
    ],
)
def test_normalize_answer(text, normalized):
    assert m.normalize_answer(text) == normalized


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("The Eiffel Tower!", "eiffel tower", 1.0),
        ("Paris France", "Paris", 2 / 3),  # P = 1/2, R = 1
        ("x x y", "x y y", 2 / 3),  # overlap counts min(count): x once, y once
        ("London", "Paris", 0.0),
        ("the", "a", 0.0),  # both normalize to nothing: no overlap, 0
        ("", "Paris", 0.0),
    ],
)
def test_qa_f1(prediction, reference, expected):
    assert m.qa_f1(prediction, reference) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        # distinct words: m = |{the, cat, sat, on, mat}| = 5, n = 3, LCS words {the, cat, sat}
        ("the cat sat", "the cat sat on the mat", rouge_f(1.0, 3 / 5)),
        # words are sets: "go go go" has one distinct word, so P = 1 (textbook ROUGE-L: 1/3)
        ("go go go", "go", rouge_f(1.0, 1.0)),
        # case and punctuation other than '.' are kept: no common word
        ("Paris, France.", "paris france", 0.0),
        # sentences split at '.': LCS({a b c}, {a c}) = {a, c}; LCS({d e}, {e d}) rebuilt as {e}; hits 3, m 5, n 4
        ("a c. e d", "a b c. d e", rouge_f(3 / 4, 3 / 5)),
        # the tie-break: LCS(ref "a b", "b a") is rebuilt as {b}, and "b" adds nothing: hits 1, m 2, n 2
        ("b a. b", "a b", rouge_f(1 / 2, 1 / 2)),
        # a whitespace-only piece after the last '.' is a sentence with the one word "": n = |{x, ""}| = 2
        ("x. ", "x", rouge_f(1 / 2, 1.0)),
        ("x", "x. ", rouge_f(1.0, 1 / 2)),
        # upstream raises on a text with no sentence; LongBench scores that 0
        ("", "x", 0.0),
        ("...", "x", 0.0),
        ("x", "", 0.0),
    ],
)
def test_rouge_l(prediction, reference, expected):
    assert m.rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize(
    ("prediction", "reference", "classes", "expected"),
    [
        ("Location", "Location", ["Location", "Date"], 1.0),
        ("Date or Location", "Date", ["Location", "Date"], 0.5),  # 1 / number of classes found
        ("Other location", "Location", ["Location", "Other location"], 0.0),  # case-sensitive substrings
        ("Locashun", "Location", ["Location", "Date"], 0.0),  # no class found: LongBench's difflib fallback never runs
        ("Date", "Location", ["Location", "Date"], 0.0),
        # found = [ab, b, abc]; "ab" is dropped as a part of the reference, and the loop then skips "b": 1/2, not 1
        ("abc", "abc", ["ab", "b", "abc"], 0.5),
        ("abc", "abc", ["b", "abc"], 1.0),  # "b" examined and dropped
    ],
)
def test_classification(prediction, reference, classes, expected):
    assert m.classification(prediction, reference, all_classes=classes) == expected


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [("Paragraph 3", 1.0), ("Paragraph 3, not 4", 0.5), ("Paragraph 13", 0.0), ("none of them", 0.0), ("3 3 1", 2 / 3)],
)
def test_retrieval(prediction, expected):
    assert m.retrieval(prediction, "Paragraph 3") == pytest.approx(expected)


def test_retrieval_rejects_a_reference_without_a_paragraph():
    with pytest.raises(ValueError, match="'Paragraph N'"):
        m.retrieval("Paragraph 3", "3")


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [("There are 12 unique paragraphs", "12", 1.0), ("12 or 13", "12", 0.5), ("", "12", 0.0), ("12", 12, 1.0)],
)
def test_count(prediction, reference, expected):
    assert m.count(prediction, reference) == expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("kitten", "sitting", 62),  # LCS "ittn": 100 * 8 / 13 = 61.5
        ("abcdefgh", "hijklmno", 12),  # LCS "h": 100 * 2 / 16 = 12.5, rounded half to even
        ("abcdefgh", "hijklmnop", 12),  # 100 * 2 / 17 = 11.8
        ("ab", "ba", 50),
        ("", "", 100),  # fuzzywuzzy: equal strings first
        ("", "x", 0),
    ],
)
def test_indel_ratio(a, b, expected):
    assert m.indel_ratio(a, b) == expected


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("\n\n# comment\n    return x\nfoo", 1.0),  # leading newlines, comment lines skipped
        ("```python\n    return x", 1.0),
        ("// a\n# b\nreturn `x`", 0.0),  # no usable line: the empty string
        ("return x", 0.8),  # indentation counts: 100 * 16 / 20
    ],
)
def test_code_similarity(prediction, expected):
    assert m.code_similarity(prediction, "    return x") == expected


def test_sample_score_takes_the_best_answer_and_cuts_few_shot_predictions():
    assert m.sample_score("hotpotqa", "Paris", ["London", "Paris"]) == 1.0
    assert m.sample_score("hotpotqa", "Paris\nFrance", ["Paris"]) == pytest.approx(2 / 3)  # scored whole
    assert m.sample_score("triviaqa", "\n\nParis\nFrance", ["Paris"]) == 1.0  # first line only
    assert m.sample_score("trec", "Location\nDate", ["Location"], ["Location", "Date"]) == 1.0
    assert m.sample_score("samsum", "a b\nc", ["a b"]) == pytest.approx(rouge_f(1.0, 1.0))
    assert m.sample_score("hotpotqa", "Paris", []) == 0.0
    with pytest.raises(ValueError, match="'lsht'.*English datasets are"):
        m.sample_score("lsht", "x", ["x"])


def _random_text(rng: random.Random, words: list[str], n: int) -> str:
    return "".join(rng.choice(words) + rng.choice(["", " ", ". ", "\n"]) for _ in range(rng.randint(0, n)))


def test_rouge_l_equals_rouge_1_0_1():
    rouge = pytest.importorskip("rouge").Rouge()
    rng = random.Random(0)
    words = ["a", "b", "the", "Cat", "cat", "dog.", ".", " ", "x,", "..", "y"]
    for _ in range(3000):
        prediction, reference = _random_text(rng, words, 12), _random_text(rng, words, 12)
        try:
            expected = rouge.get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
        except ValueError:
            expected = 0.0
        assert m.rouge_l(prediction, reference) == expected, (prediction, reference)


def test_indel_ratio_equals_rapidfuzz():
    fuzz = pytest.importorskip("rapidfuzz.fuzz")
    rng = random.Random(0)
    for _ in range(3000):
        a = "".join(rng.choice("ab c()=_") for _ in range(rng.randint(1, 20)))
        b = "".join(rng.choice("ab c()=_") for _ in range(rng.randint(1, 20)))
        assert m.indel_ratio(a, b) == round(fuzz.ratio(a, b)), (a, b)
