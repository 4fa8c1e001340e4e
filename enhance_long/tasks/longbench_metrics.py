"""LongBench's metrics, with LongBench's exact semantics (THUDM/LongBench ``metrics.py`` and ``eval.py``).

Every metric scores one prediction against one reference answer and returns a float in [0, 1]. A sample's score
is the best over its reference answers (``sample_score``); a dataset's score is the mean over samples times 100.

    >>> qa_f1("The Eiffel Tower!", "eiffel tower")
    1.0
    >>> sample_score("trec", "Location\\nDate", ["Location"], all_classes=["Location", "Date"])
    1.0

LongBench's quirks are kept on purpose, because the published numbers were computed with them; each docstring
says which. The ROUGE-L and edit-similarity scores are implemented here (no ``rouge``/``fuzzywuzzy`` dependency);
the tests check them against hand-computed values and, when installed, against ``rouge==1.0.1`` and ``rapidfuzz``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"\d+")
_PARAGRAPH = re.compile(r"Paragraph (\d+)")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization: lower-case, drop ASCII punctuation, drop the words a/an/the, collapse whitespace.

    The order matters and is LongBench's: punctuation goes before articles, so ``"the," -> ""``; only
    ``string.punctuation`` is removed, so curly quotes and dashes survive (``"’s"`` stays).
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """Bag-of-tokens F1: overlap counts each token min(count in prediction, count in reference) times.

    ``P = overlap / len(prediction)``, ``R = overlap / len(reference)``, ``F1 = 2PR / (P + R)``; 0 without overlap
    (so two empty sequences score 0, as in LongBench).
    """
    overlap = sum((Counter(prediction) & Counter(reference)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction)
    recall = overlap / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str) -> float:
    """QA F1 (NarrativeQA, Qasper, MultiFieldQA-en, HotpotQA, 2WikiMQA, MuSiQue, TriviaQA): ``token_f1`` over the
    whitespace tokens of the ``normalize_answer``-ed texts."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def _sentences(text: str) -> list[list[str]]:
    """Text as rouge 1.0.1 sees it: pieces between '.' that are non-empty *before* whitespace is collapsed, each
    split on single spaces (so a whitespace-only piece becomes the one-word sentence ``[""]``)."""
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def _lcs_words(reference: list[str], hypothesis: list[str]) -> set[str]:
    """The words of the longest common subsequence that rouge 1.0.1 reconstructs (its tie-break: on a mismatch, step
    back in the reference only when that keeps a strictly longer LCS, else step back in the hypothesis)."""
    rows, cols = len(reference), len(hypothesis)
    table = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        for j in range(1, cols + 1):
            if reference[i - 1] == hypothesis[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    words, i, j = set(), rows, cols
    while i > 0 and j > 0:
        if reference[i - 1] == hypothesis[j - 1]:
            words.add(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F as LongBench computes it: ``Rouge().get_scores([pred], [ref], avg=True)["rouge-l"]["f"]`` of the
    ``rouge==1.0.1`` package, 0 when that raises.

    That package's summary-level ROUGE-L is not the textbook one; its semantics, reproduced here exactly:

    - texts are split into sentences at every '.', case and all other punctuation kept (``"Paris,"`` != ``"paris"``);
    - words are counted as *sets*: ``m`` = distinct reference words, ``n`` = distinct prediction words;
    - ``hits`` = the number of distinct words lying on the reconstructed LCS of some (reference sentence,
      prediction sentence) pair (the union is over words, not positions);
    - ``R = hits / m``, ``P = hits / n``, ``F = 2PR / (P + R + 1e-8)``;
    - a text with no sentence (empty, or only dots) raises upstream, which LongBench scores 0.

    One deliberate difference: the package rebuilds each LCS recursively and hits Python's recursion limit when a
    reference sentence and a prediction sentence have more than about a thousand words together; LongBench then
    scores 0, this function the true value.
    """
    predicted, referenced = _sentences(prediction), _sentences(reference)
    if not predicted or not referenced:
        return 0.0
    hits = set()
    for ref_sentence in referenced:
        for pred_sentence in predicted:
            hits |= _lcs_words(ref_sentence, pred_sentence)
    recall = len(hits) / len({w for s in referenced for w in s})
    precision = len(hits) / len({w for s in predicted for w in s})
    return 2.0 * (precision * recall / (precision + recall + 1e-8))


def classification(prediction: str, reference: str, all_classes: Sequence[str]) -> float:
    """TREC: ``1 / #matches`` if the reference class is among the classes found in the prediction, else 0.

    A class is found when it is a (case-sensitive) substring of the prediction. Found classes that are substrings of
    the reference (but not the reference itself) are then dropped, with LongBench's remove-while-iterating loop:
    the class right after a dropped one is never examined, so it stays. LongBench's fallback to the most similar
    class (difflib) sits behind ``if list != 0``, which is always true, so it never runs; neither does it here.
    """
    found = [name for name in all_classes if name in prediction]
    index = 0
    while index < len(found):
        name = found[index]
        if name in reference and name != reference:
            found.remove(name)
        index += 1  # advances past the removed item's successor too: a Python list iterator does the same
    return 1.0 / len(found) if reference in found else 0.0


def _fraction_equal(numbers: list[str], target: str) -> float:
    return sum(number == target for number in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, reference: str) -> float:
    """PassageRetrieval-en: the fraction of the numbers in the prediction that equal N from the reference's
    "Paragraph N" (so "Paragraph 3, not 4" scores 0.5, and a prediction without digits 0)."""
    match = _PARAGRAPH.search(reference)
    if match is None:
        raise ValueError(
            f"retrieval reference {reference!r} has no 'Paragraph N'; LongBench answers look like 'Paragraph 7'"
        )
    return _fraction_equal(_NUMBER.findall(prediction), match.group(1))


def count(prediction: str, reference: str) -> float:
    """PassageCount: the fraction of the numbers (``\\d+`` runs) in the prediction that equal the reference."""
    return _fraction_equal(_NUMBER.findall(prediction), str(reference))


def indel_ratio(a: str, b: str) -> int:
    """``fuzz.ratio`` of fuzzywuzzy backed by python-Levenshtein (= ``round(rapidfuzz.fuzz.ratio)``): the indel
    similarity ``100 * 2 * LCS(a, b) / (len(a) + len(b))`` over characters, rounded half-to-even to an integer.

    fuzzywuzzy's guards come first: equal strings score 100 (two empty strings too), one empty string scores 0.
    """
    if a == b:
        return 100
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for char in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if char == other else max(previous[j + 1], current[j]))
        previous = current
    # python-Levenshtein's float steps, (lensum - distance) / lensum then * 100, so ties round as fuzzywuzzy's do
    return round(100 * (2 * previous[-1] / (len(a) + len(b))))


def code_similarity(prediction: str, reference: str) -> float:
    """LCC, RepoBench-P: ``indel_ratio / 100`` between the reference line and the first line of the prediction
    (after leading newlines) that contains none of '`', '#', '//' (the empty string if every line does).

    LongBench calls ``fuzzywuzzy.fuzz.ratio`` without pinning its backend (its issue #96): with python-Levenshtein
    that is the indel ratio used here, the "edit similarity" the LongBench paper names; without it, fuzzywuzzy falls
    back to difflib's Ratcliff-Obershelp ratio, a different number. Lines keep their indentation.
    """
    lines = prediction.lstrip("\n").split("\n")
    line = next((text for text in lines if "`" not in text and "#" not in text and "//" not in text), "")
    return indel_ratio(line, reference) / 100


# LongBench's metric per English dataset (eval.py's dataset2metric).
DATASET_METRIC: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1,
    "qasper": qa_f1,
    "multifieldqa_en": qa_f1,
    "hotpotqa": qa_f1,
    "2wikimqa": qa_f1,
    "musique": qa_f1,
    "gov_report": rouge_l,
    "qmsum": rouge_l,
    "multi_news": rouge_l,
    "trec": classification,
    "triviaqa": qa_f1,
    "samsum": rouge_l,
    "passage_retrieval_en": retrieval,
    "passage_count": count,
    "lcc": code_similarity,
    "repobench-p": code_similarity,
}

# LongBench scores only the first line of the prediction on these few-shot datasets (eval.py), because models go
# on imitating the examples after answering.
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum"})


def first_line(prediction: str) -> str:
    """The first line after leading newlines, as LongBench cuts few-shot predictions."""
    return prediction.lstrip("\n").split("\n")[0]


def sample_score(
    dataset: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None
) -> float:
    """One sample's score: the best of the dataset's metric over the reference ``answers`` (0 with none), computed
    on ``first_line(prediction)`` for the datasets in ``FIRST_LINE_DATASETS``."""
    if dataset not in DATASET_METRIC:
        raise ValueError(f"no LongBench metric for dataset {dataset!r}; English datasets are {sorted(DATASET_METRIC)}")
    metric = DATASET_METRIC[dataset]
    if dataset in FIRST_LINE_DATASETS:
        prediction = first_line(prediction)
    extra = {"all_classes": all_classes or []} if metric is classification else {}
    return max((metric(prediction, answer, **extra) for answer in answers), default=0.0)
