"""Documents: local .txt/.jsonl, a local Hugging Face dataset folder, the embedded Canterbury texts (from a fake cache
entry; slow: the real one), skipping short documents, and the token cache. Tokenizer: the offline byte tokenizer,
so a document of n ASCII characters is BOS + n tokens."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from enhance_long import assets, data
from enhance_long.models import byte_tokenizer

BOS = 256


@pytest.fixture
def texts(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "long.txt").write_bytes(b"line one\r\nline two\r\n" * 10)  # CRLF, as in the Canterbury files
    (folder / "short.txt").write_text("tiny")
    with open(folder / "many.jsonl", "w") as stream:
        for i in range(3):
            stream.write(json.dumps({"text": f"document {i} " * (10 + i), "id": i}) + "\n")
    return folder


def local(path, **overrides):
    return {"name": "local", "source": "local", "path": str(path), **overrides}


def test_txt_is_one_document_with_bos_and_normalised_newlines(texts, tokenizer, tmp_path):
    docs = data.load_documents(local(texts / "long.txt"), tokenizer, min_tokens=10, cache_dir=tmp_path)
    (doc,) = docs.docs
    text = "line one\nline two\n" * 10
    assert doc.name == "long.txt" and docs.skipped == 0
    assert doc.ids.dtype.is_floating_point is False and doc.ids.dim() == 1
    assert doc.ids.tolist() == [BOS, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert tokenizer.decode(doc.ids, skip_special_tokens=True) == text


def test_folder_reads_txt_and_jsonl_in_order_and_counts_skipped(texts, tokenizer, tmp_path, caplog):
    caplog.set_level("INFO", logger="enhance_long.data")
    docs = data.load_documents(local(texts), tokenizer, min_tokens=120, cache_dir=tmp_path)
    assert [d.name for d in docs.docs] == ["long.txt", "many.jsonl:2", "many.jsonl:3"]
    assert docs.skipped == 2  # many.jsonl:1 (111 tokens) and short.txt
    assert [len(d.ids) for d in docs.docs] == [1 + 180, 1 + 11 * 11, 1 + 12 * 11]
    assert "3 documents with >= 120 tokens, skipped 2 shorter" in caplog.text


def test_glob_and_max_docs_keep_the_first_long_enough(texts, tokenizer, tmp_path):
    docs = data.load_documents(local(texts / "*.jsonl", max_docs=1), tokenizer, min_tokens=120, cache_dir=tmp_path)
    assert [d.name for d in docs.docs] == ["many.jsonl:2"]
    assert docs.skipped == 1


def test_jsonl_text_field(tmp_path, tokenizer):
    (tmp_path / "r.jsonl").write_text(json.dumps({"body": "x" * 50}) + "\n\n")
    docs = data.load_documents(local(tmp_path / "r.jsonl", text_field="body"), tokenizer, 10, cache_dir=tmp_path)
    assert [len(d.ids) for d in docs.docs] == [51]
    with pytest.raises(
        ValueError, match=r"r.jsonl:1 has no string field data.text_field='text' \(fields: \['body'\]\)"
    ):
        data.load_documents(local(tmp_path / "r.jsonl"), tokenizer, 10, cache_dir=tmp_path)


def test_nothing_long_enough_is_an_error_not_an_empty_set(texts, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"min_tokens=10000 tokens \(5 read, longest 181\)"):
        data.load_documents(local(texts), tokenizer, min_tokens=10000, cache_dir=tmp_path)


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"source": "local", "path": "/no/such/*.txt"}, r"data.path='/no/such/\*.txt' matches no file"),
        ({"source": "local"}, r"data.source=local needs data.path"),
        ({"source": "s3"}, r"data.source='s3' is not one of \['canterbury', 'hf', 'local'\]"),
        ({"source": "hf"}, r"data.source=hf needs data.path"),
        ({"source": "local", "path": "x", "max_docs": 0}, r"data.max_docs=0 must be >= 1 or null"),
    ],
)
def test_config_errors(cfg, message, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=message):
        data.load_documents({"name": "bad", **cfg}, tokenizer, 10, cache_dir=tmp_path)


def test_wrong_suffix_is_refused(tmp_path, tokenizer):
    (tmp_path / "book.pdf").write_bytes(b"%PDF")
    with pytest.raises(ValueError, match=r"not one of \['.txt', '.jsonl'\]"):
        data.load_documents(local(tmp_path / "book.*"), tokenizer, 1, cache_dir=tmp_path)


def test_token_cache_is_read_back_keyed_by_tokenizer_and_text(texts, tokenizer, tmp_path):
    cfg = local(texts / "long.txt")
    first = data.load_documents(cfg, tokenizer, 1, cache_dir=tmp_path).docs[0]
    (cached,) = (tmp_path / "tokens" / data.tokenizer_fingerprint(tokenizer)).glob("*.npy")
    assert np.load(cached).tolist() == first.ids[1:].tolist()

    np.save(cached, np.arange(7, dtype=np.int32))  # the next load must come from the cache, not re-tokenize
    assert data.load_documents(cfg, tokenizer, 1, cache_dir=tmp_path).docs[0].ids.tolist() == [BOS, *range(7)]

    cached.write_bytes(b"torn")  # an unreadable entry is recomputed
    assert data.load_documents(cfg, tokenizer, 1, cache_dir=tmp_path).docs[0].ids.tolist() == first.ids.tolist()

    (texts / "long.txt").write_text("other text")  # new content, new key
    assert data.load_documents(cfg, tokenizer, 1, cache_dir=tmp_path).docs[0].ids.tolist() == [
        BOS,
        *tokenizer("other text", add_special_tokens=False)["input_ids"],
    ]


def test_fingerprint_follows_the_tokenizer_definition_not_the_object(tokenizer):
    from tokenizers import processors

    assert data.tokenizer_fingerprint(byte_tokenizer()) == data.tokenizer_fingerprint(tokenizer)
    no_bos = byte_tokenizer()
    no_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    assert no_bos("ab")["input_ids"] == no_bos("ab", add_special_tokens=False)["input_ids"]
    assert data.tokenizer_fingerprint(no_bos) != data.tokenizer_fingerprint(tokenizer)


def test_no_bos_when_the_tokenizer_does_not_add_one(texts, tmp_path):
    from tokenizers import processors

    no_bos = byte_tokenizer()
    no_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    doc = data.load_documents(local(texts / "short.txt"), no_bos, 1, cache_dir=tmp_path).docs[0]
    assert doc.ids.tolist() == no_bos("tiny", add_special_tokens=False)["input_ids"]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def test_hf_source_reads_a_local_dataset_folder(tmp_path, tokenizer, hf_cache):
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"report": "r" * (20 * (i + 1)), "summary": "s"} for i in range(4)]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "train.jsonl").write_text(json.dumps({"report": "train row", "summary": "s"}) + "\n")
    cfg = {"name": "gov", "source": "hf", "path": str(folder), "split": "test", "text_field": "report", "max_docs": 2}
    docs = data.load_documents(cfg, tokenizer, min_tokens=41, cache_dir=tmp_path)
    assert [d.name for d in docs.docs] == [f"{folder}[test]#1", f"{folder}[test]#2"]
    assert [len(d.ids) for d in docs.docs] == [41, 61]
    assert docs.skipped == 1

    with pytest.raises(ValueError, match=r"no column data.text_field='text' \(columns: \['report', 'summary'\]\)"):
        data.load_documents({**cfg, "text_field": None}, tokenizer, 1, cache_dir=tmp_path)


def test_hf_source_offline_says_how_to_prefetch(tokenizer, tmp_path, hf_cache, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    cfg = {"name": "pg19", "source": "hf", "path": "emozilla/pg19-test-not-cached", "split": "test"}
    with pytest.raises(
        RuntimeError, match=r"cannot load dataset 'emozilla/pg19-test-not-cached'.*hf download --repo-type dataset"
    ):
        data.load_documents(cfg, tokenizer, 1, cache_dir=tmp_path)


def test_hf_source_without_datasets_names_the_extra(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r'pip install "enhance-long\[hub\]"'):
        data.load_documents({"name": "pg19", "source": "hf", "path": "emozilla/pg19-test"}, tokenizer, 1, tmp_path)


def test_canterbury_reads_the_cache_entry(tmp_path, tokenizer):
    """A hand-made entry with the pinned manifest stands in for the real download (the slow test fetches it)."""
    entry = tmp_path / "canterbury"
    entry.mkdir()
    for i, name in enumerate(("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt")):
        (entry / name).write_bytes(b"word\r\n" * (10 * (i + 1)))
    assets._write_manifest(entry, assets.ARTIFACTS["canterbury"])
    docs = data.load_documents({"name": "canterbury", "source": "canterbury"}, tokenizer, 100, cache_dir=tmp_path)
    assert [(d.name, len(d.ids)) for d in docs.docs] == [
        ("asyoulik.txt", 101),
        ("lcet10.txt", 151),
        ("plrabn12.txt", 201),
    ]
    assert docs.skipped == 1


@pytest.mark.slow
def test_canterbury_real_download_gives_four_books(tmp_path, tokenizer):
    docs = data.load_documents({"name": "canterbury", "source": "canterbury"}, tokenizer, 100_000, cache_dir=tmp_path)
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "canterbury").glob("*.txt")}
    assert sizes == {"alice29.txt": 152089, "asyoulik.txt": 125179, "lcet10.txt": 426754, "plrabn12.txt": 481861}
    assert [d.name for d in docs.docs] == ["alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt"]
    assert docs.skipped == 0
    assert "ALICE'S ADVENTURES IN WONDERLAND" in tokenizer.decode(docs.docs[0].ids[:200])


CONF = Path(__file__).resolve().parent.parent / "conf" / "data"


@pytest.mark.parametrize("option", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_data_options_have_the_schema_keys(option):
    cfg = OmegaConf.load(CONF / f"{option}.yaml")
    assert list(cfg) == ["name", "source", "path", "config_name", "split", "text_field", "max_docs"]
    assert cfg.name == option and cfg.source in data.SOURCES
    assert (CONF / f"{option}.yaml").read_text().startswith("# python run.py ")


def test_data_local_without_path_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"data.path is required by this data option \(\?\?\?\); set it: data.path="):
        data.load_documents(OmegaConf.load(CONF / "local.yaml"), tokenizer, 1, cache_dir=tmp_path)
