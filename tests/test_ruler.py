"""RULER: RULER's text as fixtures, one sample per task field by field, exact lengths, scoring, the table, the job.

The fixtures below are written from NVIDIA/RULER's code (scripts/data/synthetic/constants.py, niah.py,
variable_tracking.py, common_words_extraction.py, freq_words_extraction.py, qa.py, scripts/synthetic.yaml,
scripts/eval/synthetic/constants.py); the prompts are built with the byte-level tokenizer of the tiny model, where
one character is one token, so a prompt decodes to exactly the text RULER would write.
"""

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import enhance_long.models
from enhance_long.models import byte_tokenizer
from enhance_long.results import RESULTS, read_rows
from enhance_long.runner import run
from enhance_long.tasks import get_task
from enhance_long.tasks import ruler_data as rd
from enhance_long.tasks.base import TaskEnv
from enhance_long.tasks.ruler import TASK, RulerConfig, method_scores, ruler_table, use_chat_template
from enhance_long.tasks.ruler_metrics import (
    METRICS,
    effective_length,
    match_all,
    match_part,
    postprocess,
    string_match_all,
    string_match_part,
)

ROOT = Path(__file__).resolve().parent.parent
ESSAY = (
    "The committee met again on Tuesday. It read the minutes aloud!  Was anyone surprised?\n\n"
    '"Nobody," said the chair. Mr. Smith left early. The vote was 3 to 2.'
)

# --- RULER's text, as written in its code ---------------------------------------------------------------------------

# scripts/data/synthetic/constants.py
RULER_CONSTANTS = {
    "niah": {
        "tokens_to_generate": 128,
        "template": "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
        "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
        "{type_needle_v} for {query} mentioned in the provided text?",
        "answer_prefix": " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    },
    "variable_tracking": {
        "tokens_to_generate": 30,
        "template": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",
        "answer_prefix": " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
        "variables are assigned the value {query}, they are: ",
    },
    "common_words_extraction": {
        "tokens_to_generate": 120,
        "template": "Below is a numbered list of words. In these words, some appear more often than others. Memorize "
        "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
        "answer_prefix": " Answer: The top 10 words that appear most often in the list are:",
    },
    "freq_words_extraction": {
        "tokens_to_generate": 50,
        "template": "Read the following coded text and track the frequency of each coded word. Find the three most "
        "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the "
        "dots '....'. What are the three most frequently appeared words in the above coded text?",
        "answer_prefix": " Answer: According to the coded text above, the three most frequently appeared words are:",
    },
    "qa": {
        "tokens_to_generate": 32,
        "template": "Answer the question based on the given documents. Only give me the answer and do not output any "
        "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
        "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
        "answer_prefix": " Answer:",
    },
}
# scripts/synthetic.yaml: (task, type_haystack, type_needle_k, type_needle_v, num_needle_k, num_needle_v, num_needle_q)
RULER_NIAH = [
    ("niah_single_1", "noise", "words", "numbers", 1, 1, 1),
    ("niah_single_2", "essay", "words", "numbers", 1, 1, 1),
    ("niah_single_3", "essay", "words", "uuids", 1, 1, 1),
    ("niah_multikey_1", "essay", "words", "numbers", 4, 1, 1),
    ("niah_multikey_2", "needle", "words", "numbers", 1, 1, 1),
    ("niah_multikey_3", "needle", "uuids", "uuids", 1, 1, 1),
    ("niah_multivalue", "essay", "words", "numbers", 1, 4, 1),
    ("niah_multiquery", "essay", "words", "numbers", 1, 1, 4),
]
NUMBER, UUID = r"\d{7}", r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
WORD = r"[^\s-]+(?: [^\s-]+)?-[^\s]+(?: [^\s]+)?"  # adjective-noun; a few wonderwords entries hold a space
PATTERN = {"numbers": NUMBER, "uuids": UUID, "words": WORD}


@pytest.fixture(scope="module")
def encode(tokenizer):
    return rd.Encoder(tokenizer)


def raw(turns):
    return rd.raw_frame([256], turns)  # the byte tokenizer's BOS


def sample(task, ctx, encode, index=0, seed=0, sources=rd.Sources(sentences=tuple(rd.split_sentences(ESSAY)))):  # noqa: B008
    return rd.build_prompt(task, ctx, index, seed, encode, raw, sources)


def text_of(tokenizer, prompt) -> str:
    assert prompt.ids[0] == 256  # BOS, then the text byte for byte
    return tokenizer.decode(prompt.ids[1:])


def test_templates_answer_prefixes_and_generation_lengths_are_rulers():
    assert set(rd.FAMILIES) == set(RULER_CONSTANTS)
    for family, expected in RULER_CONSTANTS.items():
        got = rd.FAMILIES[family]
        assert (got.template, got.answer_prefix, got.tokens_to_generate) == (
            expected["template"],
            expected["answer_prefix"],
            expected["tokens_to_generate"],
        )
    # niah.py, variable_tracking.py, qa.py
    assert rd.NOISE == "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    assert rd.NEEDLE == "One of the special magic {type_needle_v} for {key} is: {value}."
    assert rd.DOCUMENT == "Document {i}:\n{document}"
    # scripts/eval/synthetic/constants.py: qa is scored by string_match_part, every other family by string_match_all
    assert {family: metric for family, (metric, _) in METRICS.items()} == {
        "niah": string_match_all,
        "variable_tracking": string_match_all,
        "common_words_extraction": string_match_all,
        "freq_words_extraction": string_match_all,
        "qa": string_match_part,
    }
    numpy = pytest.importorskip("numpy")
    assert list(rd.DEPTHS) == numpy.round(numpy.linspace(0, 100, num=40, endpoint=True)).astype(int).tolist()


def test_the_task_table_is_synthetic_yaml():
    assert list(rd.TASKS) == [name for name, *_ in RULER_NIAH] + ["vt", "cwe", "fwe", "qa_1", "qa_2"]
    for name, haystack, type_k, type_v, keys, values, queries in RULER_NIAH:
        spec = rd.TASKS[name]
        assert (spec.family, spec.haystack, spec.type_k, spec.type_v) == ("niah", haystack, type_k, type_v)
        assert (spec.keys, spec.values, spec.queries, spec.category) == (keys, values, queries, rd.RETRIEVAL)
    assert [(rd.TASKS[n].family, rd.TASKS[n].category) for n in ("vt", "cwe", "fwe", "qa_1", "qa_2")] == [
        ("variable_tracking", rd.MULTI_HOP),
        ("common_words_extraction", rd.AGGREGATION),
        ("freq_words_extraction", rd.AGGREGATION),
        ("qa", rd.QA),
        ("qa", rd.QA),
    ]
    assert (rd.TASKS["qa_1"].dataset, rd.TASKS["qa_2"].dataset) == ("squad", "hotpotqa")
    assert list(rd.TASKS)[:11] == rd.SYNTHETIC
    assert OmegaConf.load(ROOT / "conf/task/ruler.yaml").tasks == rd.SYNTHETIC == RulerConfig().tasks


def test_word_lists_are_wonderwords_2_2_0():
    assert (len(rd.wonderwords_list("nounlist")), len(rd.wonderwords_list("adjectivelist"))) == (6786, 910)
    assert len(rd.cwe_words()) == 8169  # nouns + adjectives + verbs, unique
    assert {"abortion", "idiot"} <= set(rd.wonderwords_list("nounlist"))  # dropped in wonderwords 3


# --- one sample per task, field by field --------------------------------------------------------------------------

HEAD = "{a} special magic {v} {are} hidden within the following text. Make sure to memorize it. I will quiz you about the {v} afterwards.\n"
QUESTION = "\nWhat {are_all} the special magic {v} for {q} mentioned in the provided text? The special magic {v} for {q} mentioned in the provided text {are}"


@pytest.mark.parametrize(("name", "haystack", "type_k", "type_v", "keys", "values", "queries"), RULER_NIAH)
def test_niah_sample_field_by_field(tokenizer, encode, name, haystack, type_k, type_v, keys, values, queries):
    prompt = sample(name, 2048, encode)
    text = text_of(tokenizer, prompt)
    single = values * queries == 1
    v = type_v[:-1] if single else type_v
    words = {"a": "A", "are": "is", "are_all": "is"} if single else {"a": "Some", "are": "are", "are_all": "are all"}
    head = HEAD.format(v=v, **words)
    assert text.startswith(head)
    question = re.escape(QUESTION.format(v=v, q="QUERY", **words)).replace("QUERY", "(.+)")
    match = re.search(question + r"$", text)
    assert match and match.group(1) == match.group(2)
    asked = match.group(1).replace(", and ", ", ").split(", ") if queries > 1 else [match.group(1)]
    context = text[len(head) : match.start()]
    needle = re.escape(rd.NEEDLE).replace(r"\{type_needle_v\}", type_v)
    needle = needle.replace(r"\{key\}", f"({PATTERN[type_k]})").replace(r"\{value\}", f"({PATTERN[type_v]})")
    found = re.findall(needle, context)
    if haystack == "needle":  # every line is a needle (the last one trimmed); the asked key is among them
        lines = context.split("\n")
        assert all(re.fullmatch(needle, line) for line in lines[:-1]) and len(lines) - len(found) in (0, 1)
        assert prompt.shared == 1 + len(head)  # the distractors differ between samples
    else:
        assert len(found) == max(keys, queries) * values
        first = context.index("One of the special magic")
        if haystack == "noise":
            lines = context.split("\n")
            assert all(line == rd.NOISE or re.fullmatch(needle, line) for line in lines[:-1])
            assert rd.NOISE.startswith(lines[-1]) and len(lines) == prompt.haystack + len(found)
        else:  # the essay's words in order, repeated, the last one trimmed
            filler = re.sub(needle, "", context).split()
            essay = " ".join(rd.split_sentences(ESSAY)).split() * 100
            assert filler[:-1] == essay[: len(filler) - 1]
        first -= first > 0  # the separator before a needle (space, newline) is the needle's
        assert prompt.shared == 1 + len(head) + first
    assert len(asked) == queries
    values_of = {}
    for key, value in found:
        values_of.setdefault(key, []).append(value)
    assert sorted(prompt.answers) == sorted(value for key in asked for value in values_of[key])
    assert len(prompt.answers) == values * queries


def test_vt_sample_field_by_field(tokenizer, encode):
    prompt = sample("vt", 2048, encode)
    text = text_of(tokenizer, prompt)
    template, prefix = rd.FAMILIES["variable_tracking"].template, rd.FAMILIES["variable_tracking"].answer_prefix
    head, tail = template.split("{context}")
    example, main = text.split("\n\n" + head)
    # the in-context example: 3-letter names, its own value, answered after a double space, at most 500 tokens
    chain = re.findall(r"VAR ([A-Z]{3}) = (?:VAR ([A-Z]{3}) |(\d{5}))\n", example + "\n")
    assert len(chain) == 5 and chain[0][2] and all(chain[i][1] == chain[i - 1][0] for i in range(1, 5))
    names = " ".join(c[0] for c in chain)
    assert example.endswith(prefix.format(num_v=5, query=chain[0][2]) + " " + names)
    assert example.count(rd.NOISE) == 5  # one byte a token: even RULER's floor of 5 lines exceeds 500 tokens
    # the question: 5-letter names, the chain in order, the noise haystack
    lines = main[: main.index(tail.split("{query}")[0])].split("\n")
    links = [line for line in lines if line.startswith("VAR ")]
    assert [line.split()[1] for line in links] == list(prompt.answers) and len(prompt.answers) == 5
    assert all(re.fullmatch(r"[A-Z]{5}", name) for name in prompt.answers)
    value = links[0].split(" = ")[1]
    assert re.fullmatch(r"\d{5}", value) and 10000 <= int(value) <= 99998
    assert links[1:] == [f"VAR {b} = VAR {a} " for a, b in zip(prompt.answers, prompt.answers[1:], strict=False)]
    assert all(line == rd.NOISE for line in lines[:-1] if not line.startswith("VAR "))
    assert main.endswith(tail.format(query=value) + prefix.format(num_v=5, query=value))


def entries(listed: str) -> list[str]:
    """The words of a numbered list "1. a 2. b ...", checking the numbering (a few wonderwords entries hold a space)."""
    found = re.findall(r"(\d+)\. (.+?)(?= \d+\. |$)", listed)
    assert [int(number) for number, _ in found] == list(range(1, len(found) + 1))
    return [word for _, word in found]


@pytest.mark.parametrize(
    ("ctx", "common", "uncommon", "example"), [(2048, 6, 1, (20, 3, 1)), (8192, 30, 3, (40, 10, 3))]
)
def test_cwe_sample_field_by_field(tokenizer, encode, ctx, common, uncommon, example):
    prompt = sample("cwe", ctx, encode)
    text = text_of(tokenizer, prompt)
    template, prefix = (
        rd.FAMILIES["common_words_extraction"].template,
        rd.FAMILIES["common_words_extraction"].answer_prefix,
    )
    head, tail = template.split("{context}")
    assert text.startswith(head) and text.endswith(tail + prefix)
    shown, asked = text[len(head) :].split("\n" + head)
    listed, answered = shown.split(tail + prefix + " ")
    words, common_repeats, uncommon_repeats = example
    counts = Counter(entries(listed))
    assert len(counts) == words and sum(counts.values()) == 10 * common_repeats + (words - 10) * uncommon_repeats
    assert set(entries(answered)) == {word for word, _ in counts.most_common(10)} and len(entries(answered)) == 10
    main = Counter(entries(asked[: asked.rindex(tail)]))
    assert all(common - uncommon <= main[word] <= common for word in prompt.answers)  # the end may be trimmed
    assert all(count <= uncommon for word, count in main.items() if word not in prompt.answers)
    assert set(prompt.answers) <= set(rd.cwe_words()) and len(prompt.answers) == 10


def test_fwe_sample_field_by_field(tokenizer, encode):
    prompt = sample("fwe", 2048, encode)
    text = text_of(tokenizer, prompt)
    template, prefix = rd.FAMILIES["freq_words_extraction"].template, rd.FAMILIES["freq_words_extraction"].answer_prefix
    head, tail = template.split("{context}")
    assert text.startswith(head) and text.endswith(tail + prefix)
    words = text[len(head) : -len(tail + prefix)].split(" ")
    ranked = [word for word, _ in Counter(words[:-1]).most_common()]
    assert ranked[0] == "..." and ranked[1:4] == list(prompt.answers)
    assert all(re.fullmatch(r"[a-z]{6}", word) for word in ranked[1:])
    assert len(set(ranked)) <= (2048 - 50) // 50


ZEL = {
    "title": "Zel",
    "paragraphs": [
        {
            "context": "Zelbourne is the capital of Freedonia.",
            "qas": [
                {
                    "question": "What is Freedonia's capital?",
                    "answers": [{"text": "Zelbourne"}],
                    "is_impossible": False,
                },
                {"question": "Who founded it?", "answers": [], "is_impossible": True},
            ],
        },
        {"context": "The river Ost flows north.", "qas": []},
    ],
}
FILLER = [{"title": f"T{i}", "paragraphs": [{"context": f"Filler paragraph {i}.", "qas": []}]} for i in range(30)]
SQUAD = {"version": "v2.0", "data": [ZEL, *FILLER]}  # SQuAD 2.0's layout, as RULER's read_squad reads it
HOTPOT = [
    {
        "question": "Which river flows north?",
        "answer": "Ost",
        "context": [["Ost", ["The Ost ", "flows north."]], ["Zel", ["Zelbourne is a city."]]],
    },
    {"question": "Other?", "answer": "x", "context": [[f"D{i}", [f"Distractor {i}."]] for i in range(20)]},
]


@pytest.fixture(scope="module")
def qa_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ruler_qa")
    (folder / "squad.json").write_text(json.dumps(SQUAD))
    (folder / "hotpotqa.json").write_text(json.dumps(HOTPOT))
    return folder


def test_qa_reads_squad_and_hotpotqa_as_ruler_does(qa_path):
    squad = rd.read_squad(qa_path / "squad.json")
    assert len(squad.questions) == 1  # the impossible question is dropped
    question = squad.questions[0]
    assert squad.docs == tuple(sorted(squad.docs)) and squad.docs[question["context"][0]].startswith("Zelbourne")
    assert [squad.docs[i] for i in question["more"]] == ["The river Ost flows north."]
    assert question["outputs"] == ["Zelbourne"]
    hotpot = rd.read_hotpotqa(qa_path / "hotpotqa.json")
    assert [hotpot.docs[i] for i in hotpot.questions[0]["context"]] == [
        "Ost\nThe Ost flows north.",
        "Zel\nZelbourne is a city.",
    ]


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_qa_sample_field_by_field(tokenizer, encode, qa_path, task):
    data = {"squad": rd.read_squad(qa_path / "squad.json"), "hotpotqa": rd.read_hotpotqa(qa_path / "hotpotqa.json")}
    prompt = rd.build_prompt(task, 700, 0, 0, encode, raw, rd.Sources(qa=data))
    assert len(prompt.ids) == 700 - 32
    text = text_of(tokenizer, prompt)
    template = rd.FAMILIES["qa"].template
    head, tail = template.split("{context}")
    query = data[rd.TASKS[task].dataset].questions[0]["query"]
    assert text.startswith(head) and text.endswith(tail.format(query=query) + " Answer:")
    context = text[len(head) : -len(tail.format(query=query) + " Answer:")]
    numbers = [int(n) for n in re.findall(r"(?:^|\n\n)Document (\d+):\n", context)]
    assert numbers == sorted(numbers) and len(set(range(1, numbers[-1] + 1)) - set(numbers)) <= 1  # one trimmed
    gold = "Zelbourne is the capital of Freedonia." if task == "qa_1" else "Ost\nThe Ost flows north."
    assert re.search(r"Document \d+:\n" + re.escape(gold) + r"(\n\n|$)", context)
    assert prompt.answers == (("Zelbourne",) if task == "qa_1" else ("Ost",))
    with pytest.raises(ValueError, match=r"has 1 questions in squad.json; use task.samples<=1"):
        rd.build_prompt("qa_1", 700, 1, 0, encode, raw, rd.Sources(qa=data))


# --- exact lengths, seeds ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ctx", [2048, 3001, 8192])
@pytest.mark.parametrize("task", rd.SYNTHETIC)
def test_prompt_plus_generation_is_exactly_ctx_for_a_byte_tokenizer(encode, task, ctx):
    for index in range(2):
        prompt = sample(task, ctx, encode, index=index)
        assert len(prompt.ids) + rd.TASKS[task].tokens_to_generate == ctx
        assert 1 <= prompt.shared <= len(prompt.ids)


def test_samples_are_seeded_per_task_length_and_index(encode):
    first = [sample("niah_single_1", 2048, encode, index=i).ids for i in range(3)]
    assert first == [sample("niah_single_1", 2048, encode, index=i).ids for i in range(3)]
    assert len({tuple(ids) for ids in first}) == 3
    assert sample("niah_single_1", 2048, encode, seed=1).ids != first[0]
    assert sample("niah_single_1", 2049, encode).answers != sample("niah_single_1", 2048, encode).answers


def test_a_context_too_short_is_a_one_line_error(encode):
    message = r"^RULER's vt at ctx=1500 does not fit: its shortest prompt has (\d+) tokens and 1470 are left for it; use ctx>=(\d+)$"
    with pytest.raises(ValueError, match=message) as error:
        sample("vt", 1500, encode)
    shortest, suggested = map(int, re.match(message, str(error.value)).groups())
    assert suggested == shortest + 30 and len(sample("vt", suggested, encode).ids) == shortest
    with pytest.raises(ValueError, match=r"^RULER's fwe at ctx=240 does not fit: its vocabulary .* needs ctx>=250$"):
        sample("fwe", 240, encode)


def test_cwe_beyond_the_word_lists_is_a_one_line_error():
    def encode(text):  # a tokenizer of one token per character: 8169 words fill some 1.7 million tokens
        return [0] * len(text)

    message = r"^RULER's cwe at ctx=4000000 needs more haystack than there is: 8169 units fall short of 3999880 tokens$"
    with pytest.raises(ValueError, match=message):
        rd.build_prompt("cwe", 4_000_000, 0, 0, encode, raw)


def test_vt_example_holds_the_most_noise_lines_within_500_tokens(monkeypatch):
    def encode(text):  # a tokenizer of one token per word
        return [0] * len(text.split())

    real, used = rd.vt_draft, []
    monkeypatch.setattr(
        rd, "vt_draft", lambda seed, n, example_lines: used.append(example_lines) or real(seed, n, example_lines)
    )
    rd.build_prompt("vt", 4096, 0, 0, encode, raw)
    key = rd.sample_seed(0, 4096, "vt", 0)
    sizes = {n: sum(len(encode(p.text)) for p in rd.vt_example(key, n)) for n in range(5, 40)}
    assert set(used) == {max(n for n, size in sizes.items() if size <= 500)} and sizes[used[0] + 1] > 500


def test_fitting_trims_the_last_haystack_piece_only():
    def build(n):
        pieces = (
            rd.Piece("Q:", shared=True),
            *rd.joined(["abcd"] * n, " ", hay=True, shared=True),
            rd.Piece(" needle"),
        )
        return rd.Draft((pieces,), " A:", ("x",), n)

    prompt = rd.fit(build, 26, raw, lambda text: list(text.encode()))
    text = bytes(prompt.ids[1:]).decode()
    assert len(prompt.ids) == 26 and text == "Q:abcd abcd abc needle A:"  # 3 units, the third trimmed
    assert prompt.shared == 1 + len("Q:abcd abcd") and prompt.haystack == 3


def test_smallest_reaching_bisects():
    calls = []

    def length(n):
        calls.append(n)
        return 10 * n

    assert rd.smallest_reaching(length, 1234, 1) == 124
    assert len(calls) < 25
    assert rd.smallest_reaching(length, 5, 1) == 1
    assert rd.smallest_reaching(length, 1000, 1, stop=50) is None


def test_sentences_follow_punctuation():
    assert rd.split_sentences(ESSAY) == [
        "The committee met again on Tuesday.",
        "It read the minutes aloud!",
        "Was anyone surprised?",
        '"Nobody," said the chair.',
        "Mr.",
        "Smith left early.",
        "The vote was 3 to 2.",
    ]


# --- the chat template ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_tokenizer():
    chat = byte_tokenizer()
    chat.chat_template = (
        "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }} [/{{ m['role'] }}]{% endfor %}"
        "{% if add_generation_prompt %}<s>[assistant]{% endif %}"
    )
    return chat


def test_chat_frame_wraps_turns_and_the_answer_prefix_follows_the_generation_prompt(chat_tokenizer):
    frame = rd.chat_frame(chat_tokenizer, 3)
    assert frame.around == (
        "<s>[user] ",
        " [/user]<s>[assistant] ",
        " [/assistant]<s>[user] ",
        " [/user]<s>[assistant]",
    )
    assert frame.lead == ()
    prompt = rd.build_prompt("cwe", 2048, 0, 0, rd.Encoder(chat_tokenizer), lambda t: rd.chat_frame(chat_tokenizer, t))
    text = chat_tokenizer.decode(prompt.ids)
    prefix = rd.FAMILIES["common_words_extraction"].answer_prefix
    assert len(prompt.ids) == 2048 - 120 and text.count("<s>[user] Below is a numbered list") == 2
    assert re.search(r" \[/user\]<s>\[assistant\] " + re.escape(prefix) + r" 1\. \S+ 2\.", text)
    assert text.endswith(" [/user]<s>[assistant]" + prefix)
    assert use_chat_template("auto", chat_tokenizer) and not use_chat_template(False, chat_tokenizer)
    assert not use_chat_template("auto", byte_tokenizer())
    with pytest.raises(ValueError, match="task.chat_template=true but the tokenizer has no chat template"):
        use_chat_template(True, byte_tokenizer())


# --- scoring --------------------------------------------------------------------------------------------------------


def test_string_match_all_and_part_as_ruler_computes_them():
    preds = ["The numbers are 1234567 and 7654321.", "", "ALPHA-beta"]
    refs = [["1234567", "7654321", "1111111"], ["x"], ["alpha-BETA"]]
    assert string_match_all(preds, refs) == round((2 / 3 + 0 + 1) / 3 * 100, 2) == 55.56
    assert string_match_part(preds, refs) == round(2 / 3 * 100, 2) == 66.67
    assert match_all("Paris, France", ["paris", "FRANCE", "Lyon"]) == pytest.approx(2 / 3)
    assert match_part("It is in paris.", ["Lyon", "PARIS"]) == 1.0
    assert match_part("", ["a"]) == 0.0 and match_all("", ["a", "b"]) == 0.0
    assert match_all("anything", [""]) == 1.0  # an empty reference is in every prediction, as in RULER
    assert match_all("12345678", ["1234567"]) == 1.0  # substring, not word, match
    with pytest.raises(ValueError, match="no reference answers"):
        match_all("a", [])
    with pytest.raises(ValueError, match="no predictions to score"):
        string_match_all([], [])


def test_postprocess_is_rulers():
    assert postprocess("  1234567\x00\tnext\n ") == "1234567\n\nnext"
    assert postprocess("\x1b") == ""


def test_effective_length_stops_at_the_first_length_below():
    assert effective_length({4096: 90.0, 8192: 85.6, 16384: 70.0, 32768: 90.0}, 85.6) == 8192
    assert effective_length({4096: 80.0, 8192: 90.0}, 85.6) is None
    assert effective_length({8192: 99.0, 4096: 99.0}, 85.6) == 8192
    assert effective_length({}, 85.6) is None


# --- the table and the plot -------------------------------------------------------------------------------------------


def ruler_row(method, task, ctx, score, threshold=85.6, model="m"):
    return {
        "task": "ruler",
        "model": model,
        "method": method,
        "ruler_task": task,
        "ctx": ctx,
        "score": score,
        "settings": {"threshold": threshold},
        "key": f"{method}-{task}-{ctx}",
    }


def test_table_is_task_by_length_with_categories_average_and_effective_length():
    rows = [ruler_row("yarn(factor=2)", "niah_single_1", c, s) for c, s in ((4096, 100.0), (8192, 90.0), (16384, 20.0))]
    rows += [ruler_row("yarn(factor=2)", "vt", c, s) for c, s in ((4096, 80.0), (8192, 82.0), (16384, 10.0))]
    rows += [ruler_row("none", "niah_single_1", 4096, 50.0), ruler_row("none", "vt", 4096, 60.0)]
    rows.append({"task": "perplexity", "ctx": 4096, "doc": "all", "ppl": 5.0})
    table = ruler_table(rows)
    lines = table.splitlines()
    assert lines[0] == "### RULER, score x100 (model m)"
    assert lines[4:8] == [
        "| method | 4096 | 8192 | 16384 | effective length (threshold) |",
        "|---|---|---|---|---|",
        "| none | 55.00 | - | - | below 4096 (85.6) |",
        "| yarn(factor=2) | 90.00 | 86.00 | 15.00 | 8192 (85.6) |",
    ]
    section = table[table.index("#### yarn(factor=2)") :].splitlines()
    assert section[2:] == [
        "| task | category | 4096 | 8192 | 16384 |",
        "|---|---|---|---|---|",
        "| niah_single_1 | retrieval | 100.00 | 90.00 | 20.00 |",
        "| vt | multi-hop tracing | 80.00 | 82.00 | 10.00 |",
        "| retrieval | mean of 1 | 100.00 | 90.00 | 20.00 |",
        "| multi-hop tracing | mean of 1 | 80.00 | 82.00 | 10.00 |",
        "| average | 2 tasks | 90.00 | 86.00 | 15.00 |",
    ]
    assert method_scores([ruler_row("a", "vt", 4096, 90.0, threshold=50)])["a"].effective() == "4096 or more"


def test_report_writes_the_ruler_table_and_heatmap(tmp_path):
    from enhance_long.report import write_report

    rows = [ruler_row(m, t, c, 70.0) for m in ("none", "ntk") for t in ("vt", "cwe") for c in (1024, 2048)]
    written = {p.name for p in write_report(rows, tmp_path)}
    assert {"ruler_heatmap.png", "table.md", "results.csv"} <= written
    png = (tmp_path / "ruler_heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "### RULER" in (tmp_path / "table.md").read_text()
    assert get_task("ruler").brief([{**rows[0], "samples": 3, "nulls": 1}]) == "vt @ 1024: 70.00 (3 samples, 1 empty)"


# --- configuration --------------------------------------------------------------------------------------------------


def compose_ruler(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=["task=ruler", *overrides])


def test_config_composes_and_cells_are_ctx_by_task():
    cfg = compose_ruler("ctxs=[2048,4096]", "task.tasks=[vt,cwe]")
    assert TASK.name == "ruler" and TASK.uses_data is True
    assert TASK.cells(cfg.task, [2048, 4096]) == [
        {"ctx": 2048, "ruler_task": "vt"},
        {"ctx": 2048, "ruler_task": "cwe"},
        {"ctx": 4096, "ruler_task": "vt"},
        {"ctx": 4096, "ruler_task": "cwe"},
    ]
    assert (cfg.task.samples, cfg.task.threshold, cfg.task.chat_template, cfg.task.batch_size) == (5, 85.6, "auto", 1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.tasks=[]"], r"task.tasks is empty; choose from \['niah_single_1'"),
        (["task.tasks=[niah_single_4]"], r"task.tasks has 'niah_single_4', not a RULER task; choose from"),
        (["task.tasks=[vt,vt]"], "task.tasks lists vt 2 times; list each task once"),
        (["task.tasks=[qa_1]"], "task.tasks has qa_1, which reads squad from squad.json; set task.qa_path"),
        (["task.tasks=[qa_2]", "task.qa_path=/nowhere"], "task.qa_path=/nowhere has no hotpotqa.json"),
        (["task.samples=0"], r"task.samples=0; use an integer >= 1 \(RULER uses 500\)"),
        (["task.threshold=0"], r"task.threshold=0.0 is outside \(0, 100\]; RULER's is 85.6"),
        (["task.threshold=101"], r"task.threshold=101.0 is outside \(0, 100\]"),
        (["task.chat_template=maybe"], r"task.chat_template='maybe'; choose one of \('auto', True, False\)"),
        (["task.batch_size=0"], "task.batch_size=0 is invalid; it must be an integer >= 1"),
        (["ctx=100", "task.tasks=[cwe]"], "ctx=100 leaves no prompt for RULER's cwe, which generates 120 tokens"),
    ],
)
def test_bad_settings_are_one_line_errors_before_a_model_loads(overrides, message, monkeypatch, tmp_path):
    monkeypatch.setattr(enhance_long.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as error:
        run(compose_ruler(*overrides), out_dir=tmp_path)
    assert re.match("enhance-long: " + message, str(error.value)) and "\n" not in str(error.value)


def test_qa_tasks_run_with_qa_path(qa_path):
    cfg = compose_ruler(f"task.qa_path={qa_path}", "task.tasks=[qa_1,qa_2]")
    assert len(TASK.cells(cfg.task, [1024])) == 2


# --- measuring ----------------------------------------------------------------------------------------------------


class Parrot:
    """A stand-in for a model: answers each prompt with the needle values found in it."""

    def __init__(self, tokenizer):
        self.tokenizer, self.device, self.prompts = tokenizer, "cpu", []

        class Config:
            pad_token_id = tokenizer.pad_token_id
            eos_token_id = tokenizer.eos_token_id

        self.generation_config = Config()

    def generate(self, input_ids, **kwargs):
        import torch

        self.prompts.append(input_ids[0].tolist())
        text = self.tokenizer.decode(input_ids[0])
        answer = " ".join(re.findall(r"is: (\d{7})\.", text)[:1]) + "</s>"
        new = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


def test_measure_scores_samples_and_writes_predictions(tokenizer, tmp_path):
    model = Parrot(tokenizer)
    cfg = OmegaConf.structured(RulerConfig(samples=3, tasks=["niah_single_1", "niah_multivalue"]))
    data = tmp_path / "essay.txt"
    data.write_text(ESSAY * 40)
    env = TaskEnv(
        model, tokenizer, cfg, OmegaConf.create({"name": "x", "source": "local", "path": str(data)}), tmp_path
    )
    env.progress = False
    [single] = TASK.measure(env, {"ctx": 1024, "ruler_task": "niah_single_1"})
    [multi] = TASK.measure(env, {"ctx": 1024, "ruler_task": "niah_multivalue"})
    assert [len(p) for p in model.prompts] == [1024 - 128] * 6
    assert single == {
        "ctx": 1024,
        "ruler_task": "niah_single_1",
        "category": "retrieval",
        "score": 100.0,
        "samples": 3,
        "nulls": 0,
        "tokens_to_generate": 128,
        "prefix_reuse": single["prefix_reuse"],
    }
    assert 0 < single["prefix_reuse"] < 1
    assert multi["score"] == 25.0  # one value of four
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [(line["ruler_task"], line["index"]) for line in lines] == [("niah_single_1", i) for i in range(3)] + [
        ("niah_multivalue", i) for i in range(3)
    ]
    assert all(line["input_tokens"] == 896 and line["method"] is None for line in lines)
    assert lines[0]["pred"] == lines[0]["answers"][0] and lines[0]["score"] == 1.0
    TASK.measure(env, {"ctx": 1024, "ruler_task": "niah_single_1"})  # a re-measured cell replaces its lines
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ruler_corpus")
    (folder / "essay.txt").write_text(ESSAY * 50)
    return folder


def tiny_job(corpus, *extra):
    return compose_ruler(
        "model=tiny_random",
        "data=local",
        f"data.path={corpus}",
        "ctxs=[2048]",
        "progress=false",
        "task.samples=1",
        "task.tasks=[niah_single_2,vt,cwe,fwe]",
        "baseline=false",
        *extra,
    )


def test_tiny_model_end_to_end_and_resume(corpus, tmp_path, monkeypatch):
    aggregate = run(tiny_job(corpus), out_dir=tmp_path)
    assert [(r["ctx"], r["ruler_task"], r["samples"]) for r in aggregate] == [
        (2048, name, 1) for name in ("niah_single_2", "vt", "cwe", "fwe")
    ]
    rows = read_rows(tmp_path / RESULTS)
    assert all(r["task"] == "ruler" and r["data"] == "local" and 0 <= r["score"] <= 100 for r in rows)
    table = (tmp_path / "table.md").read_text()
    assert "### RULER" in table and "| cwe | aggregation |" in table and "effective length" in table
    assert (tmp_path / "ruler_heatmap.png").exists()
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 4
    monkeypatch.setattr(enhance_long.models, "load_model", lambda *a, **k: pytest.fail("nothing left to measure"))
    assert run(tiny_job(corpus), out_dir=tmp_path) == aggregate  # resumed: every cell already measured
    assert len(read_rows(tmp_path / RESULTS)) == 4


# --- the embedded tokenizer ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_env():
    from transformers import AutoTokenizer

    from enhance_long import assets

    tokenizer = AutoTokenizer.from_pretrained(str(assets.ensure("smollm2_135m", None)))
    cfg = OmegaConf.structured(RulerConfig(samples=2))
    data = OmegaConf.create({"name": "canterbury", "source": "canterbury"})
    return TaskEnv(None, tokenizer, cfg, data, Path("."), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("ctx", [2048, 4096, 8192])
def test_exact_lengths_for_smollm2_with_its_chat_template(smollm2_env, ctx):
    for task in rd.SYNTHETIC:
        prompts = TASK.prompts(smollm2_env, task, ctx)
        assert [len(p.ids) + rd.TASKS[task].tokens_to_generate for p in prompts] == [ctx, ctx], task
        text = smollm2_env.tokenizer.decode(prompts[0].ids)
        assert text.startswith("<|im_start|>system\n") and "<|im_start|>assistant\n " in text
        assert all(answer in text for answer in prompts[0].answers), task


@pytest.mark.slow
def test_smollm2_essay_haystack_is_the_canterbury_books(smollm2_env):
    prompt = TASK.prompts(smollm2_env, "niah_single_2", 4096)[0]
    text = smollm2_env.tokenizer.decode(prompt.ids)
    assert "ALICE'S ADVENTURES IN WONDERLAND Lewis Carroll" in text
    assert prompt.shared < len(prompt.ids) and text.count("One of the special magic numbers for ") == 1
