"""RULER's synthetic samples as token ids of an exact length: templates, needles, haystacks, word lists, fitting.

Pure functions of (task, length, seed, sample index) and a tokenizer; nothing here loads a model. The text that
RULER fixes -- templates, answer prefixes, the needle sentence, the noise sentence, the document header, the
insertion depths, the number of tokens to generate -- is copied as data from NVIDIA/RULER and each constant names
the file it comes from. The generators follow ``scripts/data/synthetic/{niah,variable_tracking,
common_words_extraction,freq_words_extraction,qa}.py`` and the task table ``scripts/synthetic.yaml``.

A sample is a :class:`Draft`: chat turns (user, assistant, user, ...) made of :class:`Piece` s, the answer prefix
that opens the model's reply, and the references. Each piece is tokenized on its own and the ids are concatenated,
so the lengths of pieces add up. RULER bisects the haystack size (sentences, noise lines, words, documents) by
re-tokenizing the whole text until ``prompt + tokens_to_generate <= max_seq_length``; :func:`fit` bisects the same
unit count for the smallest haystack that reaches ``ctx - tokens_to_generate`` tokens and then trims the surplus
tokens off the end of the last haystack piece, so every prompt plus its generation is exactly ``ctx`` tokens for
any tokenizer. The ids differ from tokenizing the whole text at once only at piece seams (the text is the same).
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
import string
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path

RETRIEVAL, MULTI_HOP, AGGREGATION, QA = "retrieval", "multi-hop tracing", "aggregation", "question answering"
CATEGORIES = (RETRIEVAL, MULTI_HOP, AGGREGATION, QA)  # the RULER paper's four


@dataclass(frozen=True)
class Family:
    """One of RULER's generators: its prompt template, answer prefix and generation length
    (``scripts/data/synthetic/constants.py``, ``TASKS[<family>]``)."""

    template: str
    answer_prefix: str
    tokens_to_generate: int


# scripts/data/synthetic/constants.py, verbatim.
FAMILIES = {
    "niah": Family(
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will "
        "quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} "
        "for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are",
        128,
    ),
    "variable_tracking": Family(
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
        "the value {query}, they are: ",
        30,
    ),
    "common_words_extraction": Family(
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
        "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:",
        120,
    ),
    "freq_words_extraction": Family(
        "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
        "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
        "What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:",
        50,
    ),
    "qa": Family(
        "Answer the question based on the given documents. Only give me the answer and do not output any other "
        "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
        "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
        " Answer:",
        32,
    ),
}
# scripts/data/synthetic/niah.py and variable_tracking.py: the "noise" haystack, one sentence repeated.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# scripts/data/synthetic/niah.py: the needle, also the line of the "needle" haystack (multikey_2/3).
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
# scripts/data/synthetic/qa.py: DOCUMENT_PROMPT.
DOCUMENT = "Document {i}:\n{document}"
# scripts/data/synthetic/niah.py: np.round(np.linspace(0, 100, num=40)).astype(int), the essay needle depths (%).
DEPTHS = tuple(round(100 * i / 39) for i in range(40))
# scripts/data/synthetic/variable_tracking.py: the in-context example fits in 500 tokens, has 3-letter names.
VT_EXAMPLE_TOKENS, VT_HOPS = 500, 4
# scripts/data/synthetic/common_words_extraction.py: 10 common words; below 4096 tokens fewer repeats.
CWE_COMMON, CWE_SHORT = 10, 4096
# scripts/data/synthetic/freq_words_extraction.py: coded words of 6 letters, vocabulary ctx // 50, Zipf alpha 2.0
# (RULER's scipy zeta(2.0) is pi**2 / 6).
FWE_WORD_LETTERS, FWE_VOCAB_PER, FWE_ZETA = 6, 50, math.pi**2 / 6
QA_FILES = {"squad": "squad.json", "hotpotqa": "hotpotqa.json"}  # scripts/data/synthetic/json/download_qa_dataset.sh


@dataclass(frozen=True)
class Spec:
    """One RULER task (``scripts/synthetic.yaml``): its generator and that generator's arguments."""

    family: str
    category: str
    haystack: str = "noise"  # niah/vt: noise | essay | needle
    type_k: str = "words"  # niah: numbers | words | uuids
    type_v: str = "numbers"
    keys: int = 1  # niah: num_needle_k, num_needle_v, num_needle_q
    values: int = 1
    queries: int = 1
    dataset: str | None = None  # qa: squad | hotpotqa

    @property
    def tokens_to_generate(self) -> int:
        return FAMILIES[self.family].tokens_to_generate


# scripts/synthetic.yaml; vt: num_chains 1, num_hops 4; cwe: freq_cw 30, freq_ucw 3, num_cw 10; fwe: alpha 2.0.
TASKS = {
    "niah_single_1": Spec("niah", RETRIEVAL, "noise", "words", "numbers"),
    "niah_single_2": Spec("niah", RETRIEVAL, "essay", "words", "numbers"),
    "niah_single_3": Spec("niah", RETRIEVAL, "essay", "words", "uuids"),
    "niah_multikey_1": Spec("niah", RETRIEVAL, "essay", "words", "numbers", keys=4),
    "niah_multikey_2": Spec("niah", RETRIEVAL, "needle", "words", "numbers"),
    "niah_multikey_3": Spec("niah", RETRIEVAL, "needle", "uuids", "uuids"),
    "niah_multivalue": Spec("niah", RETRIEVAL, "essay", "words", "numbers", values=4),
    "niah_multiquery": Spec("niah", RETRIEVAL, "essay", "words", "numbers", queries=4),
    "vt": Spec("variable_tracking", MULTI_HOP),
    "cwe": Spec("common_words_extraction", AGGREGATION),
    "fwe": Spec("freq_words_extraction", AGGREGATION),
    "qa_1": Spec("qa", QA, dataset="squad"),
    "qa_2": Spec("qa", QA, dataset="hotpotqa"),
}
SYNTHETIC = [name for name, spec in TASKS.items() if spec.family != "qa"]  # need no data beyond a haystack text


# --- word lists -------------------------------------------------------------------------------------------------


@functools.cache
def wonderwords_list(name: str) -> tuple[str, ...]:
    """A word list of the ``wonderwords`` package (``nounlist``, ``adjectivelist``, ``verblist``), sorted, unique:
    the lists RULER reads through ``wonderwords.random_word._get_words_from_text_file``."""
    text = (files("wonderwords") / "assets" / f"{name}.txt").read_text(encoding="utf-8")
    return tuple(sorted({line.strip() for line in text.splitlines() if line.strip()}))


@functools.cache
def cwe_words() -> tuple[str, ...]:
    """cwe's pool: wonderwords' nouns, adjectives and verbs together (``common_words_extraction.py``)."""
    return tuple(sorted({w for name in ("nounlist", "adjectivelist", "verblist") for w in wonderwords_list(name)}))


def random_value(rng: random.Random, kind: str) -> str:
    """A needle key or value (``niah.py``): a 7-digit number, an ``adjective-noun`` word, or a UUID4.

    RULER draws words from the sorted list of every adjective-noun pair; both lists hold no repeats, so drawing the
    adjective and the noun independently is the same distribution without building 6 million strings."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(wonderwords_list('adjectivelist'))}-{rng.choice(wonderwords_list('nounlist'))}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"needle type {kind!r} is unknown; use numbers, words or uuids")


# --- haystack text --------------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])|(?<=[.!?][\"')\]])\s+")


def split_sentences(text: str) -> list[str]:
    """``text`` with its whitespace collapsed to single spaces (as RULER treats its essays), cut into sentences
    after ``.``, ``!`` or ``?`` (and a closing quote or bracket) that a space and a capital, digit or opening quote
    follow. A plain rule in place of NLTK's Punkt: it also cuts after abbreviations such as "Mr."."""
    collapsed = " ".join(text.split())
    return [sentence for sentence in _SENTENCE_END.split(collapsed) if sentence]


# --- samples before tokenization --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """A run of prompt text tokenized on its own."""

    text: str
    hay: bool = False  # haystack filler: fitting trims tokens off the end of the last such piece
    shared: bool = False  # the same in every sample of one (task, length): a prefix KV cache could reuse it


@dataclass(frozen=True)
class Draft:
    """One sample before tokenization: chat turns (user, assistant, user, ...), the answer prefix that opens the
    model's reply (after the chat template's generation prompt), and the references."""

    turns: tuple[tuple[Piece, ...], ...]
    answer_prefix: str
    answers: tuple[str, ...]
    haystack: int  # haystack units: noise lines, sentences, words or documents


def joined(texts: Sequence[str], sep: str, **flags: bool) -> list[Piece]:
    """Pieces for ``sep.join(texts)``: the separator opens each piece but the first, where tokenizers expect it
    (a word's leading space, a line's newline)."""
    return [Piece(text if i == 0 else sep + text, **flags) for i, text in enumerate(texts)]


def template_pieces(template: str, context: list[Piece], **fields: str) -> list[Piece]:
    """The template split at ``{context}``: its head (shared) and its tail around the context pieces."""
    head, tail = template.split("{context}")
    return [Piece(head.format(**fields), shared=True), *context, Piece(tail.format(**fields))]


def interleaved(units: Sequence[str], inserts: Sequence[tuple[int, str]], sep: str, shared: bool) -> list[Piece]:
    """Pieces for the haystack ``units`` joined by ``sep`` with each ``(i, text)`` of ``inserts`` placed before unit
    ``i`` (after the last for ``i == len(units)``; in the given order where several share a place). Units are
    haystack, trimmable and, when ``shared``, the same in every sample; inserts are the sample's own."""
    at: dict[int, list[str]] = {}
    for i, text in inserts:
        at.setdefault(i, []).append(text)
    texts, hay = [], []
    for i in range(len(units) + 1):
        texts += at.get(i, [])
        hay += [False] * len(at.get(i, []))
        if i < len(units):
            texts.append(units[i])
            hay.append(True)
    return [replace(p, hay=h, shared=h and shared) for p, h in zip(joined(texts, sep), hay, strict=True)]


def _singular(text: str) -> str:
    """niah.py's wording for one needle asked: "Some ... are all" becomes "A ... is"."""
    for plural, single in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(plural, single)
    return text


def niah_draft(spec: Spec, seed: str, n: int, sentences: Sequence[str] = ()) -> Draft:
    """A needle-in-a-haystack sample (``niah.py``) with ``n`` haystack units: noise lines, distractor needles, or
    essay sentences (``sentences``, repeated when ``n`` exceeds them)."""
    rng = random.Random(seed)
    keys, values, needles = [], [], []
    for _ in range(max(spec.keys, spec.queries)):
        keys.append(random_value(rng, spec.type_k))
        values.append([random_value(rng, spec.type_v) for _ in range(spec.values)])
        needles += [NEEDLE.format(type_needle_v=spec.type_v, key=keys[-1], value=value) for value in values[-1]]
    rng.shuffle(needles)
    if spec.haystack == "essay":  # at sentence boundaries, at depths (%) drawn from RULER's 40
        document = [sentences[i % len(sentences)] for i in range(n)]
        depths = sorted(int(n * (depth / 100)) for depth in rng.sample(DEPTHS, len(needles)))
        context = interleaved(document, list(zip(depths, needles, strict=True)), " ", shared=True)
    else:  # before random lines of noise, or of distractor needles
        if spec.haystack == "noise":
            lines = [NOISE] * n
        else:
            lines = [
                NEEDLE.format(
                    type_needle_v=spec.type_v, key=random_value(rng, spec.type_k), value=random_value(rng, spec.type_v)
                )
                for _ in range(n)
            ]
        slots = rng.sample(range(n), len(needles))
        context = interleaved(lines, list(zip(slots, needles, strict=True)), "\n", shared=spec.haystack == "noise")
    chosen = rng.sample(range(len(keys)), spec.queries)
    queries = [keys[i] for i in chosen]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    family, type_v = FAMILIES["niah"], spec.type_v
    template, prefix = family.template, family.answer_prefix
    if spec.queries * spec.values == 1:
        template, prefix, type_v = _singular(template), _singular(prefix), type_v[:-1]
    pieces = template_pieces(template, context, type_needle_v=type_v, query=query)
    answers = tuple(value for i in chosen for value in values[i])
    return Draft((tuple(pieces),), prefix.format(type_needle_v=type_v, query=query), answers, n)


def _names(rng: random.Random, count: int, letters: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    return names


def vt_pieces(rng: random.Random, n: int, letters: int) -> tuple[list[Piece], str, list[str]]:
    """One variable-tracking text (``variable_tracking.py``, noise haystack, one chain of four hops): its pieces
    up to the question, the value asked for, and the chain's variables in order."""
    names = _names(rng, VT_HOPS + 1, letters)
    value = str(rng.randrange(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(VT_HOPS)]
    slots = sorted(rng.sample(range(n), len(chain)))  # chain[j] goes before noise line slots[j]
    context = interleaved([NOISE] * n, list(zip(slots, chain, strict=True)), "\n", shared=True)
    return template_pieces(FAMILIES["variable_tracking"].template, context, query=value), value, names


def vt_answer_prefix(value: str) -> str:
    return FAMILIES["variable_tracking"].answer_prefix.format(num_v=VT_HOPS + 1, query=value)


def vt_example(seed: str, n: int) -> list[Piece]:
    """The in-context example's question with ``n`` noise lines, as RULER sizes it (at most 500 tokens)."""
    pieces, value, _ = vt_pieces(random.Random(seed), n, letters=3)
    return [*pieces, Piece(vt_answer_prefix(value))]


def vt_draft(seed: str, n: int, example_lines: int) -> Draft:
    """A variable-tracking sample with ``n`` noise lines, after RULER's in-context example (``vt_example`` of the
    same seed: 3-letter names, its own random value, ``example_lines`` noise lines, answered) in the same turn."""
    rng = random.Random(seed)
    example, example_value, example_names = vt_pieces(rng, example_lines, letters=3)
    answered = vt_answer_prefix(example_value) + " " + " ".join(example_names) + "\n\n"
    example = [replace(p, hay=False, shared=False) for p in example] + [Piece(answered)]
    pieces, value, names = vt_pieces(rng, n, letters=5)
    return Draft((tuple(example + pieces),), vt_answer_prefix(value), tuple(names), n)


def numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def word_list(rng: random.Random, count: int, common_repeats: int, uncommon_repeats: int) -> tuple[str, list[str]]:
    """cwe's numbered list (``get_example``): ``count`` random words, the first 10 repeated ``common_repeats``
    times and the rest ``uncommon_repeats`` times, shuffled; and the 10 common words."""
    pool = cwe_words()
    if count > len(pool):
        raise ValueError(f"cwe needs {count} distinct words; the wonderwords lists hold {len(pool)}")
    chosen = rng.sample(pool, count)
    common, uncommon = chosen[:CWE_COMMON], chosen[CWE_COMMON:]
    words = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(words)
    return numbered(words), common


def cwe_draft(seed: str, n: int, ctx: int) -> Draft:
    """A common-words sample (``common_words_extraction.py``): one answered example (40 words, 10 and 3 repeats;
    below 4096 tokens 20 words, 3 and 1) as its own chat exchange, then ``n`` words (30 and 3 repeats; 6 and 1)."""
    rng = random.Random(seed)
    short = ctx < CWE_SHORT
    family = FAMILIES["common_words_extraction"]
    example, example_answer = word_list(rng, *((20, 3, 1) if short else (40, 10, 3)))
    context, answer = word_list(rng, n, *((6, 1) if short else (30, 3)))
    asked = (Piece(family.template.format(context=example)),)
    answered = (Piece(family.answer_prefix + " " + numbered(example_answer)),)
    main = tuple(template_pieces(family.template, [Piece(context, hay=True)]))
    return Draft((asked, answered, main), family.answer_prefix, tuple(answer), n)


def fwe_vocabulary(rng: random.Random, ctx: int) -> list[str]:
    """fwe's coded words: ``(ctx - 50) // 50`` distinct random 6-letter words, sorted then shuffled, the first
    replaced by ``...`` (the most frequent, treated as noise)."""
    size = (ctx - FAMILIES["freq_words_extraction"].tokens_to_generate) // FWE_VOCAB_PER
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LETTERS)))
    words = sorted(vocab)
    rng.shuffle(words)
    return ["...", *words[1:]]


def fwe_draft(seed: str, n: int, ctx: int) -> Draft:
    """A frequent-words sample (``freq_words_extraction.py``): the k-th coded word repeated
    ``int(n * k**-2 / zeta(2))`` times, shuffled; the answers are the 2nd to 4th most frequent."""
    rng = random.Random(seed)
    vocab = fwe_vocabulary(rng, ctx)
    words = [w for k, w in enumerate(vocab, start=1) for _ in range(int(n * (k**-2.0) / FWE_ZETA))]
    rng.shuffle(words)
    family = FAMILIES["freq_words_extraction"]
    head, tail = family.template.split("{context}")
    # The template's space before {context} opens the context piece, where it joins the first word's token.
    pieces = (Piece(head.rstrip(" "), shared=True), Piece(" " + " ".join(words), hay=True), Piece(tail))
    return Draft((pieces,), family.answer_prefix, tuple(vocab[1:4]), n)


# --- question answering (user-supplied SQuAD / HotpotQA) ---------------------------------------------------------------


@dataclass(frozen=True)
class QaData:
    """Questions and the documents they draw from, as ``qa.py``'s ``read_squad`` / ``read_hotpotqa`` build them."""

    docs: tuple[str, ...]  # sorted, unique
    questions: tuple[dict, ...]  # {query, outputs, context: [doc index], more: [doc index]}


def read_squad(path: Path) -> QaData:
    """SQuAD (RULER uses the 2.0 dev set): one gold paragraph per answerable question; the article's other
    paragraphs are the first distractors."""
    articles = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    docs = sorted({p["context"] for a in articles for p in a["paragraphs"]})
    index = {doc: i for i, doc in enumerate(docs)}
    questions = []
    for article in articles:
        article_docs = [index[p["context"]] for p in article["paragraphs"]]
        for paragraph in article["paragraphs"]:
            gold = index[paragraph["context"]]
            for qa in paragraph["qas"]:
                if not qa.get("is_impossible", False):
                    questions.append(
                        {
                            "query": qa["question"],
                            "outputs": [a["text"] for a in qa["answers"]],
                            "context": [gold],
                            "more": [i for i in article_docs if i != gold],
                        }
                    )
    return QaData(tuple(docs), tuple(questions))


def read_hotpotqa(path: Path) -> QaData:
    """HotpotQA (RULER uses the distractor dev set): a question's ten paragraphs, ``title\\nsentences``, are its
    own documents."""
    records = json.loads(Path(path).read_text(encoding="utf-8"))

    def doc(title, sentences):
        return f"{title}\n{''.join(sentences)}"

    docs = sorted({doc(t, s) for r in records for t, s in r["context"]})
    index = {d: i for i, d in enumerate(docs)}
    questions = [
        {"query": r["question"], "outputs": [r["answer"]], "context": [index[doc(t, s)] for t, s in r["context"]]}
        for r in records
    ]
    return QaData(tuple(docs), tuple(questions))


QA_READERS = {"squad": read_squad, "hotpotqa": read_hotpotqa}


def qa_draft(seed: str, n: int, data: QaData, question: int) -> Draft:
    """A QA sample (``qa.py``): question ``question`` with ``n`` documents -- its own, then its article's others
    (SQuAD), then random ones -- shuffled and numbered; all documents, repeated, once ``n`` reaches them."""
    rng = random.Random(seed)
    record = data.questions[question]
    gold, more = list(record["context"]), list(record.get("more", []))
    if n < len(data.docs):
        if n - len(gold) > len(more):
            taken = set(gold + more)
            others = [i for i in range(len(data.docs)) if i not in taken]
            chosen = gold + more + rng.sample(others, n - len(gold) - len(more))
        else:
            chosen = gold + rng.sample(more, n - len(gold))
    else:
        chosen = (list(range(len(data.docs))) * -(-n // len(data.docs)))[:n]
    rng.shuffle(chosen)
    own = set(gold)
    texts = [DOCUMENT.format(i=i + 1, document=data.docs[d]) for i, d in enumerate(chosen)]
    context = [replace(p, hay=d not in own) for p, d in zip(joined(texts, "\n\n"), chosen, strict=True)]
    pieces = template_pieces(FAMILIES["qa"].template, context, query=record["query"])
    return Draft((tuple(pieces),), FAMILIES["qa"].answer_prefix, tuple(record["outputs"]), n)


# --- tokens -------------------------------------------------------------------------------------------------------


class Encoder:
    """Token ids of a piece of text without special tokens, memoized for short texts (noise lines, sentences,
    documents and templates repeat across samples and across the bisection's trials)."""

    MEMO_CHARS = 4096

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.memo: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        ids = self.memo.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if len(text) <= self.MEMO_CHARS:
                self.memo[text] = ids
        return ids


@dataclass(frozen=True)
class Frame:
    """What surrounds the turns: ids before everything (a raw prompt's BOS) and the text before each turn and after
    the last (the chat template's generation prompt)."""

    lead: tuple[int, ...]
    around: tuple[str, ...]


def raw_frame(lead: Sequence[int], turns: int) -> Frame:
    """RULER's ``base`` template: the turns as they are, a newline after each answer (cwe's example)."""
    return Frame(tuple(lead), tuple("\n" if 0 < i < turns and i % 2 == 0 else "" for i in range(turns + 1)))


def chat_frame(tokenizer, turns: int) -> Frame:
    """The tokenizer's chat template around ``turns`` alternating user/assistant messages, with the generation
    prompt; found by rendering markers in place of the messages."""
    markers = [f"<<ruler-turn-{i}>>" for i in range(turns)]
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": m} for i, m in enumerate(markers)]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    around = []
    for marker in markers:
        before, found, text = text.partition(marker)
        if not found:
            raise ValueError(
                "the tokenizer's chat template does not keep messages verbatim; use task.chat_template=false"
            )
        around.append(before)
    return Frame((), (*around, text))


@dataclass(frozen=True)
class Prompt:
    """A sample as the model gets it."""

    ids: list[int]  # exactly ctx - tokens_to_generate
    answers: tuple[str, ...]
    shared: int  # leading ids that every sample of its (task, length) has: what a prefix KV cache could reuse
    haystack: int  # haystack units before trimming


def _pieces(draft: Draft, frame: Frame) -> list[Piece]:
    pieces = []
    for before, turn in zip(frame.around, draft.turns, strict=False):
        pieces += [Piece(before, shared=True), *turn]
    return [*pieces, Piece(frame.around[-1], shared=True), Piece(draft.answer_prefix)]


def smallest_reaching(length: Callable[[int], int], target: int, start: int, stop: int | None = None) -> int | None:
    """The smallest ``n >= start`` with ``length(n) >= target``, by doubling then bisection (``length`` growing
    with ``n``); None if even ``stop`` falls short."""
    low, high = start, start
    while length(high) < target:
        if stop is not None and high >= stop:
            return None
        low, high = high + 1, high * 2 if stop is None else min(high * 2, stop)
    while low < high:
        middle = (low + high) // 2
        if length(middle) >= target:
            high = middle
        else:
            low = middle + 1
    return high


def fit(
    build: Callable[[int], Draft],
    budget: int,
    frame: Callable[[int], Frame],
    encode: Callable[[str], list[int]],
    smallest: int = 1,
    largest: int | None = None,
    what: str = "this task",
    generated: int = 0,
) -> Prompt:
    """The sample ``build(n)`` with the smallest haystack ``n >= smallest`` that reaches ``budget`` tokens, trimmed
    to exactly ``budget``: surplus tokens come off the end of the last haystack pieces (never a needle or the
    question). A budget that even the smallest haystack overflows is an error, not a mutilated sample; ``what`` and
    ``generated`` (the tokens generated after the prompt) word it."""

    @functools.cache
    def tokenized(n: int) -> tuple[Draft, list[Piece], list[list[int]], int]:
        draft = build(n)
        lead = frame(len(draft.turns)).lead
        pieces = _pieces(draft, frame(len(draft.turns)))
        ids = [encode(p.text) for p in pieces]
        return draft, pieces, ids, len(lead) + sum(map(len, ids))

    n = smallest_reaching(lambda k: tokenized(k)[3], budget, smallest, largest)
    if n is None:
        raise ValueError(f"{what} needs more haystack than there is: {largest} units fall short of {budget} tokens")
    draft, pieces, ids, total = tokenized(n)
    if n == smallest and total > budget:
        raise ValueError(
            f"{what} does not fit: its shortest prompt has {total} tokens and {budget} are left for it; "
            f"use ctx>={total + generated}"
        )
    ids = [list(chunk) for chunk in ids]
    surplus, trimmed = total - budget, len(pieces)
    for i in reversed(range(len(pieces))):
        if surplus == 0:
            break
        if pieces[i].hay:
            cut = min(surplus, len(ids[i]))
            ids[i] = ids[i][: len(ids[i]) - cut]
            surplus, trimmed = surplus - cut, i
    if surplus:
        raise ValueError(f"{what} does not fit: {surplus} tokens too many after trimming the whole haystack")
    lead = list(frame(len(draft.turns)).lead)
    shared = len(lead)
    for i, (piece, chunk) in enumerate(zip(pieces, ids, strict=True)):
        if not piece.shared or i >= trimmed:
            break
        shared += len(chunk)
    return Prompt(lead + [t for chunk in ids for t in chunk], draft.answers, shared, draft.haystack)


# --- one sample of one task --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sources:
    """The texts a task draws on besides its word lists."""

    sentences: tuple[str, ...] = ()  # the essay haystack: the data= corpus cut into sentences
    qa: Mapping[str, QaData] = field(default_factory=dict)  # dataset name -> questions and documents


def sample_seed(seed: int, ctx: int, task: str, index: int) -> str:
    """The seed of one sample: each (task, length, index) draws its own, so cells are independent."""
    return f"{seed}:{ctx}:{task}:{index}"


def build_prompt(
    task: str,
    ctx: int,
    index: int,
    seed: int,
    encode: Callable[[str], list[int]],
    frame: Callable[[int], Frame],
    sources: Sources = Sources(),  # noqa: B008 (frozen, never mutated)
) -> Prompt:
    """Sample ``index`` of ``task`` at length ``ctx``: a prompt of exactly ``ctx - tokens_to_generate`` ids."""
    spec = TASKS[task]
    key = sample_seed(seed, ctx, task, index)
    what = f"RULER's {task} at ctx={ctx}"
    smallest, largest = 1, None
    if spec.family == "niah":
        if spec.haystack == "essay" and not sources.sentences:
            raise ValueError(f"RULER's {task} needs an essay haystack; the data= corpus gave no text")
        build = functools.partial(niah_draft, spec, key, sentences=sources.sentences)
        if spec.haystack != "essay":
            smallest = max(spec.keys, spec.queries) * spec.values
    elif spec.family == "variable_tracking":

        def example_tokens(n: int) -> int:
            return sum(len(encode(piece.text)) for piece in vt_example(key, n))

        lines = smallest_reaching(example_tokens, VT_EXAMPLE_TOKENS + 1, VT_HOPS + 1)
        build = functools.partial(vt_draft, key, example_lines=max(VT_HOPS + 1, lines - 1))
        smallest = VT_HOPS + 1
    elif spec.family == "common_words_extraction":
        build = functools.partial(cwe_draft, key, ctx=ctx)
        smallest, largest = CWE_COMMON, len(cwe_words())
    elif spec.family == "freq_words_extraction":
        if (ctx - spec.tokens_to_generate) // FWE_VOCAB_PER < 4:
            raise ValueError(f"{what} does not fit: its vocabulary of (ctx - 50) // 50 coded words needs ctx>=250")
        build = functools.partial(fwe_draft, key, ctx=ctx)
    else:
        data = sources.qa[spec.dataset]
        if index >= len(data.questions):
            raise ValueError(
                f"RULER's {task} has {len(data.questions)} questions in {QA_FILES[spec.dataset]}; "
                f"use task.samples<={len(data.questions)}"
            )
        build = functools.partial(qa_draft, key, data=data, question=index)
        smallest = len(data.questions[index]["context"])
    budget = ctx - spec.tokens_to_generate
    return fit(build, budget, frame, encode, smallest, largest, what, spec.tokens_to_generate)
