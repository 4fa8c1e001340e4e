"""Pinned assets and their cache: fetch, verify, atomic install, and every way a cache entry can be unusable.

Fast tests use a fake artifact (a small tarball made in tmp_path, installed with --source-dir) and, for the no-network
path, the real pip pointed at an index that refuses connections. The real downloads are fetched by the slow tests
in test_models.py and test_data.py.
"""

import hashlib
import io
import json
import tarfile

import pytest

from enhance_long import assets

TEXTS = {"fake-1.0/texts/a.txt": b"first text\n" * 50, "fake-1.0/texts/b.txt": b"second text\n" * 70}


def make_tarball(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A pinned artifact `fake` whose source tarball sits in tmp_path/src; returns (artifact, source_dir, cache)."""
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    sha = make_tarball(source_dir / "fake-1.0.tar.gz", TEXTS)
    artifact = assets.Artifact(
        name="fake",
        requirement="enhance-long-fake-asset==1.0",
        pip_args=("--no-binary", ":all:"),
        filename="fake-1.0.tar.gz",
        sha256=sha,
        size_mb=1,
        members=tuple(TEXTS),
        license="test",
        build=assets._build_texts,
    )
    monkeypatch.setitem(assets.ARTIFACTS, "fake", artifact)
    return artifact, source_dir, tmp_path / "cache"


@pytest.fixture
def installs(monkeypatch):
    """Counts real installs (download + build), so a test can tell a cache hit from a fetch without timing."""
    calls = []
    original = assets._install

    def counting(source, root, source_dir):
        calls.append(source.name)
        return original(source, root, source_dir)

    monkeypatch.setattr(assets, "_install", counting)
    return calls


@pytest.fixture
def no_network(monkeypatch):
    """Point the real pip at an index that refuses connections and ignore any user pip config."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv(assets.CACHE_ENV, raising=False)
    assert assets.cache_root() == tmp_path / "home" / ".cache" / "enhance_long"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_root() == tmp_path / "xdg" / "enhance_long"
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "env"))
    assert assets.cache_root() == tmp_path / "env"
    assert assets.cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert assets.cache_root("~/x") == tmp_path / "home" / "x"


def test_pins_are_complete():
    assert set(assets.ARTIFACTS) == {"smollm2_135m", "canterbury"}
    for name, artifact in assets.ARTIFACTS.items():
        assert artifact.name == name
        assert len(artifact.sha256) == 64 and int(artifact.sha256, 16) >= 0
        assert "==" in artifact.requirement and artifact.members
    assert [m.rsplit("/", 1)[1] for m in assets.ARTIFACTS["canterbury"].members] == [
        "alice29.txt",
        "asyoulik.txt",
        "lcet10.txt",
        "plrabn12.txt",
    ]


def test_unknown_asset_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown asset 'nope'.*canterbury.*smollm2_135m"):
        assets.ensure("nope")


def test_install_then_cache_hit(fake, installs):
    artifact, source_dir, cache = fake
    entry = assets.ensure("fake", cache, source_dir)
    assert entry == cache / "fake"
    assert sorted(p.name for p in entry.iterdir()) == ["a.txt", "b.txt", assets.MANIFEST]
    assert (entry / "a.txt").read_bytes() == TEXTS["fake-1.0/texts/a.txt"]
    manifest = json.loads((entry / assets.MANIFEST).read_text())
    assert manifest["source_sha256"] == artifact.sha256
    assert manifest["files"]["b.txt"]["size"] == len(TEXTS["fake-1.0/texts/b.txt"])
    assert assets.check_entry(entry, artifact) is None
    assert installs == ["fake"]

    assets._verified.clear()  # as in a new process: the entry is re-hashed, and still not re-installed
    assert assets.ensure("fake", cache, source_dir) == entry
    assert installs == ["fake"]
    assert not list(cache.glob(".fake.tmp-*"))


def test_bad_download_hash_is_refused_and_leaves_nothing(fake):
    artifact, source_dir, cache = fake
    (source_dir / artifact.filename).write_bytes(b"not the pinned file")
    with pytest.raises(
        assets.AssetError, match=rf"fake-1.0.tar.gz has sha256 [0-9a-f]{{64}}, pinned {artifact.sha256}"
    ):
        assets.ensure("fake", cache, source_dir)
    assert not (cache / "fake").exists()
    assert not list(cache.glob(".fake.tmp-*"))


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda entry: (entry / "a.txt").write_bytes(b"first text\n"), "a.txt is 11 bytes, expected 550 (truncated"),
        (lambda entry: (entry / "a.txt").write_bytes(b"FIRST TEXT\n" * 50), "a.txt does not match its sha256"),
        (lambda entry: (entry / "b.txt").unlink(), "b.txt is missing"),
        (lambda entry: (entry / assets.MANIFEST).unlink(), "no readable manifest.json"),
        (lambda entry: (entry / assets.MANIFEST).write_text("{"), "no readable manifest.json"),
    ],
    ids=["truncated", "modified", "missing", "no-manifest", "torn-manifest"],
)
def test_damaged_entry_is_detected_and_replaced(fake, installs, damage, problem):
    artifact, source_dir, cache = fake
    entry = assets.ensure("fake", cache, source_dir)
    damage(entry)
    assert problem in assets.check_entry(entry, artifact)

    assert assets.ensure("fake", cache, source_dir) == entry
    assert installs == ["fake", "fake"]
    assert (entry / "a.txt").read_bytes() == TEXTS["fake-1.0/texts/a.txt"]
    assert assets.check_entry(entry, artifact) is None
    assert not list(cache.glob(".fake.tmp-*"))


def test_entry_of_another_release_is_not_used(fake):
    artifact, source_dir, cache = fake
    entry = assets.ensure("fake", cache, source_dir)
    newer = assets.Artifact(**{**artifact.__dict__, "sha256": "0" * 64})
    assert "another release" in assets.check_entry(entry, newer)


def test_interrupted_install_leftovers_are_cleaned(fake):
    _, source_dir, cache = fake
    leftover = cache / ".fake.tmp-killed" / "entry"
    leftover.mkdir(parents=True)
    (leftover / "a.txt").write_text("half")
    assets.ensure("fake", cache, source_dir)
    assert not (cache / ".fake.tmp-killed").exists()


def test_missing_source_file_says_how_to_get_it(fake, tmp_path):
    _, _, cache = fake
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(assets.AssetError, match=r"not in --source-dir .*pip download --no-deps --no-binary :all:"):
        assets.ensure("fake", cache, empty)


def test_offline_fetch_is_one_line_with_the_fix(fake, no_network):
    _, _, cache = fake
    with pytest.raises(assets.AssetError) as err:
        assets.ensure("fake", cache)
    message = str(err.value)
    assert "\n" not in message
    assert "cannot download enhance-long-fake-asset==1.0 (no network access to the package index)" in message
    assert "python -m enhance_long.assets fetch fake" in message
    assert not (cache / "fake").exists()


def test_corrupt_entry_offline_is_never_used(fake, no_network):
    artifact, source_dir, cache = fake
    entry = assets.ensure("fake", cache, source_dir)
    (entry / "b.txt").write_bytes(b"x")
    with pytest.raises(assets.AssetError, match=r"cache entry .*fake is unusable \(b.txt is 1 bytes.*cannot download"):
        assets.ensure("fake", cache)
    assert assets.check_entry(entry, artifact) is not None  # still refused on the next call


def test_cli_where_status_fetch(fake, capsys):
    _, source_dir, cache = fake
    assert assets.main(["--cache-dir", str(cache), "where"]) == 0
    assert capsys.readouterr().out.strip() == str(cache)

    assert assets.main(["--cache-dir", str(cache), "status"]) == 0
    assert "fake           not fetched" in capsys.readouterr().out

    assert assets.main(["--cache-dir", str(cache), "fetch", "fake", "--source-dir", str(source_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(cache / "fake")
    assert assets.main(["--cache-dir", str(cache), "status"]) == 0
    assert f"{'fake':14} {'ok':40} {cache / 'fake'}" in capsys.readouterr().out


def test_cli_fetch_failure_is_one_error_line(fake, tmp_path, capsys):
    _, _, cache = fake
    code = assets.main(["--cache-dir", str(cache), "fetch", "fake", "--source-dir", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: fake-1.0.tar.gz is not in --source-dir")
