"""Long documents, tokenized once and cached: the embedded Canterbury texts, a Hugging Face dataset, or local files.

`data_cfg` is a `conf/data/*.yaml` mapping (DictConfig or dict):

    name         label used in results
    source       canterbury (embedded, see enhance_long.assets) | hf (datasets.load_dataset) | local (files)
    path         hf: dataset id or local dataset folder; local: a file, folder, glob, or a list of them
    config_name  hf: dataset subset (optional)
    split        hf: split, default test
    text_field   hf and .jsonl: the field holding the text, default text
    max_docs     keep at most this many documents, the first long enough ones in order (optional)

Local files: a `.txt` is one document (newlines normalised to "\\n"); a `.jsonl` is one document per line.

Token ids are the document's text tokenized without special tokens, preceded by the BOS token when the tokenizer
adds one by default (Llama-2/3, Mistral: yes; SmolLM2, Qwen2.5: no), i.e. what the model saw at the start of a
training sequence. Documents shorter than `min_tokens` are skipped and counted, never padded.

Tokenizing a 500k-character book takes seconds, so ids are cached on disk under `<cache root>/tokens/`, keyed by a
hash of the tokenizer (its full definition, not its name) and a hash of the document text.

Usage:
    docs = load_documents({"name": "canterbury", "source": "canterbury"}, tokenizer, min_tokens=4096)
    for doc in docs.docs: ...  # doc.name, doc.ids (1-D LongTensor)
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from enhance_long import assets

logger = logging.getLogger(__name__)

SOURCES = ("canterbury", "hf", "local")
LOCAL_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class Document:
    name: str  # file name, "file.jsonl:line", or "dataset[split]#row"
    ids: torch.Tensor  # 1-D int64 token ids


@dataclass(frozen=True)
class DocumentSet:
    docs: list[Document]
    skipped: int  # documents read but shorter than min_tokens


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides `tokenizer`'s output: two tokenizers with equal fingerprints give equal ids."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(_bos_prefix(tokenizer)).encode())
    return digest.hexdigest()[:24]


def _bos_prefix(tokenizer) -> list[int]:
    """[bos_token_id] if the tokenizer prepends BOS by default, else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    default = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if default[:1] == [bos] and plain[:1] != [bos] else []


def _read_jsonl(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(
                    f"{path}:{number} is not JSON ({err}); a .jsonl file holds one object per line"
                ) from err
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{path}:{number} has no string field data.text_field={text_field!r} (fields: {fields}); "
                    f"set data.text_field to the one holding the text"
                )
            yield f"{path.name}:{number}", record[text_field]


def local_files(patterns: str | list[str]) -> list[Path]:
    """The .txt/.jsonl files named by `patterns`: files, folders (their .txt/.jsonl files, recursively) or globs."""
    files: list[Path] = []
    for pattern in [patterns] if isinstance(patterns, str | os.PathLike) else list(patterns):
        expanded = os.path.expanduser(os.fspath(pattern))
        matches = [Path(m) for m in sorted(glob.glob(expanded, recursive=True))]
        if not matches:
            raise ValueError(f"data.path={expanded!r} matches no file; give a .txt/.jsonl file, a folder or a glob")
        for match in matches:
            if match.is_dir():
                files += sorted(p for p in match.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
            elif match.suffix in LOCAL_SUFFIXES:
                files.append(match)
            else:
                raise ValueError(
                    f"data.path matched {str(match)!r}, not one of {list(LOCAL_SUFFIXES)}; narrow the glob"
                )
    if not files:
        raise ValueError(f"data.path={patterns!r} holds no {'/'.join(LOCAL_SUFFIXES)} file; point it at the texts")
    return files


def _hf_texts(data_cfg: Mapping, path: str, split: str, text_field: str) -> Iterator[tuple[str, str]]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError('data.source=hf needs the datasets package: pip install "enhance-long[hub]"') from err
    local = Path(path).expanduser()
    try:
        dataset = datasets.load_dataset(
            os.fspath(local) if local.exists() else path, data_cfg.get("config_name"), split=split
        )
    except (OSError, ConnectionError) as err:
        raise RuntimeError(
            f"cannot load dataset {path!r} split {split!r} ({str(err).splitlines()[0]}); on a machine with access run "
            f"`hf download --repo-type dataset {path} --local-dir DIR` and set data.path=DIR, or use data=local"
        ) from err
    if text_field not in dataset.column_names:
        raise ValueError(
            f"dataset {path!r} has no column data.text_field={text_field!r} (columns: {dataset.column_names}); "
            f"set data.text_field"
        )
    # Row by row, so that max_docs stops reading a large split early.
    for row, record in enumerate(dataset.select_columns([text_field])):
        yield f"{path}[{split}]#{row}", record[text_field]


def iter_texts(data_cfg: Mapping, cache_dir: str | os.PathLike | None = None) -> Iterator[tuple[str, str]]:
    """(name, text) of every document `data_cfg` describes, in a fixed order."""
    source = data_cfg.get("source") or "canterbury"
    text_field = data_cfg.get("text_field") or "text"
    if source == "canterbury":
        entry = assets.ensure("canterbury", cache_dir)
        for path in sorted(entry.glob("*.txt")):
            yield path.name, path.read_text(encoding="utf-8")
    elif source == "local":
        if not data_cfg.get("path"):
            raise ValueError(
                "data.source=local needs data.path (a .txt/.jsonl file, folder or glob); set data.path=..."
            )
        for path in local_files(data_cfg["path"]):
            if path.suffix == ".jsonl":
                yield from _read_jsonl(path, text_field)
            else:
                yield path.name, path.read_text(encoding="utf-8")
    elif source == "hf":
        if not data_cfg.get("path"):
            raise ValueError("data.source=hf needs data.path (a dataset id like emozilla/pg19-test); set data.path=...")
        yield from _hf_texts(data_cfg, os.fspath(data_cfg["path"]), data_cfg.get("split") or "test", text_field)
    else:
        raise ValueError(f"data.source={source!r} is not one of {list(SOURCES)}; set data.source=canterbury or so")


def _cached_ids(tokenizer, text: str, folder: Path) -> np.ndarray:
    """Token ids of `text` without special tokens, from `folder` if tokenized before."""
    path = folder / f"{hashlib.sha256(text.encode('utf-8')).hexdigest()[:32]}.npy"
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):  # missing, or a torn write from another process
        pass
    ids = np.asarray(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int32)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as stream:
        np.save(stream, ids)
    os.replace(stream.name, path)
    return ids


def load_documents(
    data_cfg: Mapping, tokenizer, min_tokens: int, cache_dir: str | os.PathLike | None = None
) -> DocumentSet:
    """The documents of `data_cfg` with at least `min_tokens` tokens (BOS included), tokenized by `tokenizer`.

    `cache_dir` is the cache root (see `enhance_long.assets.cache_root`) holding the Canterbury texts and the
    token cache. Raises ValueError if no document is long enough.
    """
    if isinstance(data_cfg, DictConfig) and OmegaConf.missing_keys(data_cfg):
        missing = sorted(OmegaConf.missing_keys(data_cfg))
        raise ValueError(f"data.{missing[0]} is required by this data option (???); set it: data.{missing[0]}=...")
    if min_tokens < 1:
        raise ValueError(f"min_tokens={min_tokens} must be >= 1; pass the longest context length to be evaluated")
    max_docs = data_cfg.get("max_docs")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"data.max_docs={max_docs} must be >= 1 or null (all documents); set data.max_docs=null")
    folder = assets.cache_root(cache_dir) / "tokens" / tokenizer_fingerprint(tokenizer)
    prefix = _bos_prefix(tokenizer)
    docs: list[Document] = []
    skipped = longest = 0
    for name, text in iter_texts(data_cfg, cache_dir):
        ids = _cached_ids(tokenizer, text, folder)
        length = len(prefix) + len(ids)
        longest = max(longest, length)
        if length < min_tokens:
            skipped += 1
            continue
        docs.append(Document(name, torch.cat([torch.tensor(prefix, dtype=torch.long), torch.from_numpy(ids).long()])))
        if max_docs is not None and len(docs) >= max_docs:
            break
    label = data_cfg.get("name") or data_cfg.get("source")
    if not docs:
        raise ValueError(
            f"no document of data={label} has min_tokens={min_tokens} tokens ({skipped} read, longest {longest}); "
            f"evaluate shorter lengths or use longer documents (data=pg19)"
        )
    logger.info("data %s: %d documents with >= %d tokens, skipped %d shorter", label, len(docs), min_tokens, skipped)
    return DocumentSet(docs, skipped)
