"""Saving, checking and loading trained exit heads (safetensors weights + a JSON manifest).

Layout: ``<model folder>/exit_heads/heads.safetensors`` and ``manifest.json``. The manifest names the
model (config hash and a fingerprint of its final-norm weights, so heads never silently attach to a
different checkpoint with the same architecture), the layers, adapter shapes, the weights file's
SHA-256, the training data, seed, metrics and calibrated thresholds. Anything wrong raises
:class:`ExitHeadsError` naming the file and the problem; falling back to the shared head happens only
when the caller allows it, and then with a warning.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from helios_rl.exits.heads import TunedExitHeads, new_adapter
from helios_rl.models.heads import CONFIDENCE_MEASURES, ExitTarget, is_no_exit
from helios_rl.utils.io import atomic_write_bytes, atomic_write_json

FORMAT = "helios_rl.exit_heads/1"
WEIGHTS_FILE = "heads.safetensors"
MANIFEST_FILE = "manifest.json"
HEADS_DIRNAME = "exit_heads"
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype",
                         "architectures", "use_cache", "quantization_config"}


class ExitHeadsError(ValueError):
    """Exit heads that cannot be used with this model; the message names the file and the problem."""


SHIPPED_DIR = Path(__file__).parent / "shipped"


def default_heads_dir(model) -> Path:
    """Where ``tune-exits`` saves and the registry looks first for a model's heads."""
    return Path(model.path) / HEADS_DIRNAME


def shipped_heads_dir(name: str) -> Path | None:
    """The heads installed with helios_rl for bundled model ``name`` (None when none ship)."""
    folder = SHIPPED_DIR / name
    return folder if (folder / MANIFEST_FILE).exists() else None


def config_hash(model) -> str:
    """SHA-256 (16 hex) of the model's architecture config, ignoring serialisation-only keys."""
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_fingerprint(model) -> str:
    """SHA-256 (16 hex) of the checkpoint's non-layer tensors: 1-D ones (final norm) whole, 2-D ones
    (embeddings, LM head) by their first rows; read from the file as float32, so device and dtype do
    not change it."""
    from safetensors import safe_open

    layer_prefix = model.family.layer_prefix(0).rsplit(".", 2)[0] + "."
    h = hashlib.sha256()
    for key in sorted(model.ckpt.key_file):
        if key.startswith(layer_prefix):
            continue
        with safe_open(model.ckpt.key_file[key], framework="pt") as fh:
            sl = fh.get_slice(key)
            shape = sl.get_shape()
            if len(shape) not in (1, 2):
                continue
            t = sl[:] if len(shape) == 1 else sl[:4]
        h.update(key.encode())
        h.update(t.to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def model_identity(model) -> dict:
    return {"name": model.name, "model_type": model.config.model_type, "num_layers": model.num_layers,
            "hidden_size": model.hidden_size, "vocab_size": model.vocab_size, "config_hash": config_hash(model),
            "weights_fingerprint": weights_fingerprint(model)}


def save_exit_heads(model, heads: TunedExitHeads, rank: int, extra: dict, path: str | Path | None = None) -> Path:
    """Write ``heads`` (adapters, vocabulary subset) and a manifest; returns the folder.

    ``extra`` adds manifest sections (data, seed, training, metrics, thresholds, ...).
    """
    folder = Path(path) if path is not None else default_heads_dir(model)
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, dict[str, list[int]]] = {}
    for layer, adapter in sorted(heads.adapters.items()):
        shapes[str(layer)] = {}
        for name, t in adapter.state_dict().items():
            tensors[f"layers.{layer}.{name}"] = t.detach().to("cpu", torch.float32).contiguous()
            shapes[str(layer)][name] = list(t.shape)
    if heads.vocab_ids is not None:  # int32: every vocabulary here is far below 2**31
        tensors["vocab_ids"] = heads.vocab_ids.detach().to("cpu", torch.int32).contiguous()
    blob = st_save(tensors, metadata={"format": FORMAT})
    atomic_write_bytes(folder / WEIGHTS_FILE, blob)
    manifest = describe(model, heads, rank, extra)
    manifest["shapes"] = shapes
    manifest["weights"] = {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    atomic_write_json(folder / MANIFEST_FILE, manifest)
    return folder


def describe(model, heads: TunedExitHeads, rank: int, extra: dict) -> dict:
    """Manifest sections that do not depend on the weights file."""
    return {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_identity(model),
        "layers": sorted(int(k) for k in heads.adapters),
        "head": {"kind": "lowrank_norm_subset", "rank": int(rank), "hidden_size": model.hidden_size,
                 "vocab_subset": None if heads.vocab_ids is None else int(heads.vocab_ids.numel())},
        **extra,
    }


def read_manifest(folder: str | Path) -> dict:
    """The manifest in ``folder`` (ExitHeadsError when missing or unreadable)."""
    file = Path(folder) / MANIFEST_FILE
    if not file.exists():
        raise ExitHeadsError(f"{file}: manifest not found")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExitHeadsError(f"{file}: corrupt manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExitHeadsError(f"{file}: not an exit-heads manifest (expected format {FORMAT!r})")
    for key in ("model", "layers", "head", "shapes", "weights"):
        if key not in manifest:
            raise ExitHeadsError(f"{file}: manifest lacks {key!r}")
    return manifest


def build_heads(model, manifest: dict, folder: Path) -> TunedExitHeads:
    """Check ``manifest`` and its weights against ``model`` and build the heads (nothing attached yet)."""
    mfile, wfile = folder / MANIFEST_FILE, folder / manifest["weights"].get("file", WEIGHTS_FILE)
    ident, want = manifest["model"], model_identity(model)
    for key in ("config_hash", "weights_fingerprint"):
        if ident.get(key) != want[key]:
            raise ExitHeadsError(f"{mfile}: heads were trained for model {ident.get('name')!r} ({key} "
                                 f"{ident.get(key)}), not for {model.name!r} ({key} {want[key]})")
    if not wfile.exists():
        raise ExitHeadsError(f"{wfile}: weights file not found")
    blob = wfile.read_bytes()
    if hashlib.sha256(blob).hexdigest() != manifest["weights"].get("sha256"):
        raise ExitHeadsError(f"{wfile}: corrupt weights file (SHA-256 differs from {mfile.name})")
    try:
        tensors = st_load(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise ExitHeadsError(f"{wfile}: corrupt weights file ({exc})") from None
    rank = manifest["head"].get("rank")
    if not isinstance(rank, int) or rank < 1:
        raise ExitHeadsError(f"{mfile}: head rank must be a positive integer, got {rank!r}")
    vocab_ids = tensors.pop("vocab_ids", None)
    if vocab_ids is not None:
        vocab_ids = vocab_ids.to(torch.int64)
        if vocab_ids.dim() != 1 or vocab_ids.numel() == 0 or int(vocab_ids.min()) < 0 \
                or int(vocab_ids.max()) >= model.vocab_size or vocab_ids.unique().numel() != vocab_ids.numel():
            raise ExitHeadsError(f"{wfile}: vocab_ids must be distinct token ids in [0, {model.vocab_size})")
    heads = TunedExitHeads(model.heads, model, vocab_ids)
    layers = manifest["layers"]
    if not isinstance(layers, list) or not all(isinstance(x, int) for x in layers):
        raise ExitHeadsError(f"{mfile}: 'layers' must be a list of integers")
    for layer in layers:
        if not 0 <= layer < model.num_layers:
            raise ExitHeadsError(f"{mfile}: exit layer {layer} is outside {model.name}'s 0..{model.num_layers - 1}")
        adapter = new_adapter(model, rank)
        state = {}
        for name, expected in adapter.state_dict().items():
            key = f"layers.{layer}.{name}"
            if key not in tensors:
                raise ExitHeadsError(f"{wfile}: missing tensor {key!r}")
            t = tensors.pop(key)
            if tuple(t.shape) != tuple(expected.shape):
                raise ExitHeadsError(f"{wfile}: tensor {key!r} has shape {tuple(t.shape)}, this model needs "
                                     f"{tuple(expected.shape)}")
            state[name] = t
        adapter.load_state_dict(state, strict=True)
        adapter.to(device=model.device, dtype=model.dtype).requires_grad_(False).eval()
        heads.adapters[layer] = adapter
    if tensors:
        raise ExitHeadsError(f"{wfile}: unexpected tensors {sorted(tensors)[:4]} (layers in the manifest: {layers})")
    heads.thresholds = parse_thresholds(manifest.get("thresholds", {}), mfile)
    heads.targets = parse_targets(manifest.get("targets", {}), mfile)
    for t in heads.targets.values():
        if not set(t.layers) <= set(heads.adapters):
            raise ExitHeadsError(f"{mfile}: target {t.target:g} uses layers {list(t.layers)} without trained heads "
                                 f"(heads: {sorted(heads.adapters)})")
    heads.source = str(folder)
    heads.manifest = manifest
    if heads.vocab_ids is not None:  # gathered rows in the model's dtype
        heads.sub_weight = heads.sub_weight.to(model.dtype)
    return heads


def parse_thresholds(section: dict, mfile: Path) -> dict[str, dict[int, float]]:
    """``{"by_measure": {measure: {layer: thr}}}`` -> ``{measure: {int layer: float}}``, validated."""
    out: dict[str, dict[int, float]] = {}
    for measure, table in (section.get("by_measure") or {}).items():
        if measure not in CONFIDENCE_MEASURES or not isinstance(table, dict):
            raise ExitHeadsError(f"{mfile}: bad thresholds entry {measure!r}")
        out[measure] = {}
        for layer, thr in table.items():
            if not isinstance(thr, (int, float)) or not 0.0 <= thr <= 1.0:
                raise ExitHeadsError(f"{mfile}: threshold {thr!r} for layer {layer} ({measure}) is not in [0, 1]")
            out[measure][int(layer)] = float(thr)
    return out


def parse_targets(section: dict, mfile: Path) -> dict[float, ExitTarget]:
    """``{"0.95": {"layers": [..], "thresholds": {measure: {layer: thr}}, ...}}`` -> ``{0.95: ExitTarget}``."""
    out: dict[float, ExitTarget] = {}
    if not isinstance(section, dict):
        raise ExitHeadsError(f"{mfile}: 'targets' must be a mapping of precision targets")
    for key, spec in section.items():
        try:
            t = float(key)
        except ValueError:
            raise ExitHeadsError(f"{mfile}: precision target {key!r} is not a number") from None
        if is_no_exit(t):
            raise ExitHeadsError(f"{mfile}: precision target {key!r} is reserved: target 1 means no early exit on every "
                                 f"model and cannot be calibrated")
        if not 0.0 < t < 1.0 or not isinstance(spec, dict) or not isinstance(spec.get("layers"), list):
            raise ExitHeadsError(f"{mfile}: bad precision target entry {key!r}")
        thr = parse_thresholds({"by_measure": spec.get("thresholds", {})}, mfile)
        layers = tuple(sorted(int(x) for x in spec["layers"]))
        for m, tab in thr.items():
            if set(tab) != set(layers):
                raise ExitHeadsError(f"{mfile}: target {key}: {m} thresholds cover layers {sorted(tab)}, "
                                     f"not the target's {list(layers)}")
        out[t] = ExitTarget(t, layers, thr, dict(spec.get("heldout", {})), dict(spec.get("served", {})))
    return out


def load_exit_heads(model, path: str | Path | None = None, allow_fallback: bool = False) -> bool:
    """Attach trained exit heads to ``model``; True when attached.

    ``path`` None looks in :func:`default_heads_dir` and returns False when nothing is there. Bad
    heads raise :class:`ExitHeadsError`, or with ``allow_fallback`` warn and keep the shared head.
    """
    folder = Path(path) if path is not None else default_heads_dir(model)
    if path is None and not (folder / MANIFEST_FILE).exists():
        return False
    try:
        if path is not None and not folder.exists():
            raise ExitHeadsError(f"{folder}: exit-heads folder not found")
        heads = build_heads(model, read_manifest(folder), folder)
    except ExitHeadsError as exc:
        if not allow_fallback:
            raise
        warnings.warn(f"{exc}; using the shared exit head instead", RuntimeWarning, stacklevel=2)
        return False
    heads.origin = "shipped" if folder.resolve().parent == SHIPPED_DIR.resolve() else \
        ("tuned" if path is None else "folder")
    model.heads = heads
    return True


def attach_heads(model, heads: str = "auto") -> bool:
    """Registry hook. ``auto``: the user's own ``tune-exits`` output beside the model when there is
    one, else the heads shipped with helios_rl for a bundled model, else none; ``shipped`` only the
    shipped ones; ``shared`` never; anything else is a heads folder. Heads that do not match the model
    (config hash, weights fingerprint, file hashes) are an error, never a silent fall-back."""
    if heads == "shared":
        return False
    if heads == "auto" and (default_heads_dir(model) / MANIFEST_FILE).exists():
        return load_exit_heads(model)
    if heads in ("auto", "shipped"):
        shipped = shipped_heads_dir(model.name)
        if shipped is None:
            if heads == "shipped":
                raise ExitHeadsError(f"no exit heads ship for {model.name!r} (shipped: "
                                     f"{', '.join(sorted(p.name for p in SHIPPED_DIR.glob('*'))) or 'none'})")
            return False
        return load_exit_heads(model, shipped)
    return load_exit_heads(model, heads)


def enabled_layers(model, measure: str = "max_prob") -> tuple[int, ...]:
    """Exit layers worth evaluating: the manifest's selected layers whose calibrated threshold is below 1."""
    heads = model.heads
    if not isinstance(heads, TunedExitHeads):
        return ()
    thr = heads.thresholds.get(measure, {})
    return tuple(l for l in sorted(heads.adapters) if thr.get(l, 1.0) < 1.0)
