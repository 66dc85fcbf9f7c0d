"""The embedded models' files: a GGUF inside its wheel or assembled from part wheels into the cache, and the
converted copy the torch engine reads — written once, atomically, under the cache entry's lock. Fake packages
stand in for the wheels (the real Gemma 3 load is in test_gemma3.py)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from lcc_harness.errors import ModelLoadError, ModelNotFoundError
from lcc_harness.models.embedded import EMBEDDED, Embedded, converted_dir, ensure_converted
from tests.test_models import assert_one_line_naming

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def _fake_package(root: Path, name: str, body: str) -> None:
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(body)


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """A package whose assemble() writes PAYLOAD (or fails as told by FAKE_ASSEMBLE) and counts its calls."""
    root = tmp_path / "site"
    _fake_package(
        root,
        "fake_parts_pkg",
        "import os\n"
        "calls = []\n"
        "def assemble(output_path=None, overwrite=False):\n"
        "    calls.append(output_path)\n"
        "    mode = os.environ.get('FAKE_ASSEMBLE', '')\n"
        "    with open(output_path, 'wb') as f:\n"
        f"        f.write({PAYLOAD[:100]!r})\n"
        "        if mode == 'sha':\n"
        "            raise ValueError('Assembled file sha256 did not match expected value')\n"
        "        if mode == 'missing':\n"
        "            raise FileNotFoundError('Missing chunk files: part02')\n"
        f"        f.write({PAYLOAD[100:]!r})\n"
        "    return output_path\n",
    )
    monkeypatch.syspath_prepend(str(root))
    yield Embedded("fake-270m", "fake_parts_pkg", "pip install fake", "Q4_K_M", "fake.gguf", assembled=True)
    sys.modules.pop("fake_parts_pkg", None)


def test_the_registry_names_both_embedded_models():
    assert set(EMBEDDED) >= {"smollm2-135m", "gemma3-270m"}
    assert EMBEDDED["gemma3-270m"].assembled and EMBEDDED["gemma3-270m"].convert
    assert not EMBEDDED["smollm2-135m"].assembled


def test_a_missing_wheel_names_the_install_command(tmp_path):
    emb = Embedded(
        "gone-1m", "no_such_pkg_xyz", "pip install 'lcc-harness[gone]'", "Q4_0", "x.gguf", assembled=True
    )
    with pytest.raises(ModelNotFoundError) as info:
        emb.gguf_path(tmp_path)
    assert_one_line_naming(info.value, "gone-1m", "pip install 'lcc-harness[gone]'")


def test_parts_are_assembled_once_into_the_cache(fake_parts, tmp_path):
    import fake_parts_pkg

    cache = tmp_path / "cache"
    path = fake_parts.gguf_path(cache)
    assert path == cache / "models" / "fake.gguf"
    assert path.read_bytes() == PAYLOAD
    assert fake_parts.gguf_path(cache) == path
    assert len(fake_parts_pkg.calls) == 1  # the second call found the file
    assert [p.name for p in (cache / "models").iterdir() if p.name.endswith(".part")] == []


@pytest.mark.parametrize(
    ("mode", "words"), [("sha", ("sha256", "force-reinstall")), ("missing", ("part02", "force-reinstall"))]
)
def test_a_failed_assembly_is_one_line_and_leaves_nothing(fake_parts, tmp_path, monkeypatch, mode, words):
    monkeypatch.setenv("FAKE_ASSEMBLE", mode)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError) as info:
        fake_parts.gguf_path(cache)
    assert_one_line_naming(info.value, "fake-270m", *words)
    left = [p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")]
    assert left == []  # neither the target nor the half-written temp file


def test_the_converted_copy_is_written_once_and_atomically(tmp_path):
    folder = converted_dir(EMBEDDED["gemma3-270m"], tmp_path, "abc-tf5")
    calls = []

    def convert(tmp: Path) -> None:
        calls.append(tmp)
        assert tmp.parent == folder.parent and tmp != folder and not folder.exists()
        (tmp / "model.safetensors").write_bytes(b"w")
        (tmp / "config.json").write_text("{}")

    assert ensure_converted(folder, convert) == folder
    assert ensure_converted(folder, convert) == folder
    assert len(calls) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_a_conversion_that_dies_leaves_no_folder_and_the_next_one_cleans_up(tmp_path):
    folder = converted_dir(EMBEDDED["gemma3-270m"], tmp_path, "abc-tf5")
    stale = folder.parent / f".{folder.name}.killed"  # what a SIGKILLed conversion leaves
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")

    def broken(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        ensure_converted(folder, broken)
    assert not folder.exists()
    assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == []  # its temp folder and the stale one

    ensure_converted(folder, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert (folder / "config.json").is_file()


def test_two_runs_convert_once(tmp_path):
    folder = converted_dir(EMBEDDED["gemma3-270m"], tmp_path, "k")
    calls = []
    gate = threading.Event()

    def slow(tmp: Path) -> None:
        calls.append(os.getpid())
        gate.wait(5)
        (tmp / "config.json").write_text("{}")

    threads = [threading.Thread(target=ensure_converted, args=(folder, slow)) for _ in range(2)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(10)
    assert len(calls) == 1 and (folder / "config.json").is_file()
