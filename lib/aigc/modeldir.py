"""One model-directory format and one loader.

A model directory is what `transformers.AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)` load (config, safetensors weights, tokenizer files), plus
`aigc.json`: the training config, the metrics, the step, and a sha256 for every other file.
Evaluation, search export and serving all load through :func:`load_model`, which verifies the
checksums and refuses pickled weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer

METADATA = "aigc.json"
FORMAT = "aigc-model/1"
# Pickle-based formats run code on load; a served model must never need them.
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".h5", ".msgpack")


class ModelDirError(ValueError):
    """A model directory is missing, incomplete, tampered with, or holds unsafe weights."""


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, in eval mode
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    meta: dict[str, Any]  # aigc.json ({} for a plain hub/local base model)
    path: str


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != METADATA)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished temp dir into place; an existing `out` is replaced only after the new one is whole."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _temp_sibling(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")


def write_metadata(root: Path, *, config: dict[str, Any], metrics: dict[str, Any], step: int, **extra: Any) -> dict:
    """Checksum every file under `root` and write aigc.json beside them."""
    files = {str(p.relative_to(root)): sha256_file(p) for p in _files(root)}
    meta = {"format": FORMAT, "step": step, "metrics": metrics, "config": config, "files": files, **extra}
    (root / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=False, default=str))
    return meta


def save_model_dir(
    model: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    config: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    step: int = 0,
    **extra: Any,
) -> Path:
    """Write `model` + `tokenizer` as a model directory, atomically (readers never see a half-written one)."""
    out = Path(out_dir)
    tmp = _temp_sibling(out)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        unsafe = [p.name for p in _files(tmp) if p.suffix in UNSAFE_SUFFIXES]
        if unsafe:  # save_pretrained writes safetensors in transformers 5; guard against a silent change
            raise ModelDirError(f"{out}: refusing to write non-safetensors weights {unsafe}")
        write_metadata(tmp, config=config, metrics=metrics or {}, step=step, **extra)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path) / METADATA
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise ModelDirError(f"{path}: not an aigc model directory (no {METADATA})") from None
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{p}: corrupt metadata: {e}") from None
    if meta.get("format") != FORMAT:
        raise ModelDirError(f"{p}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def verify_model_dir(path: str | os.PathLike) -> dict[str, Any]:
    """Check every file against aigc.json and that the weights are safetensors; returns the metadata."""
    root = Path(path)
    if not root.is_dir():
        raise ModelDirError(f"{root}: no such model directory")
    meta = read_metadata(root)
    listed: dict[str, str] = meta.get("files", {})
    present = {str(p.relative_to(root)) for p in _files(root)}
    problems = []
    for name in sorted(present):
        if Path(name).suffix in UNSAFE_SUFFIXES:
            problems.append(f"{name}: unsafe (pickle-based) weights are refused; use safetensors")
    if not any(n.endswith(".safetensors") for n in listed):
        problems.append("no .safetensors weights listed")
    for name in sorted(set(listed) - present):
        problems.append(f"{name}: listed in {METADATA} but missing")
    for name in sorted(present - set(listed)):
        problems.append(f"{name}: not listed in {METADATA} (unexpected file)")
    for name in sorted(set(listed) & present):
        if sha256_file(root / name) != listed[name]:
            problems.append(f"{name}: sha256 mismatch (file changed since it was exported)")
    if problems:
        raise ModelDirError(f"{root}: failed verification:\n  " + "\n  ".join(problems))
    return meta


def load_model(
    path: str | os.PathLike,
    *,
    device: str = "cpu",
    dtype: Any = None,
    require_metadata: bool = True,
) -> LoadedModel:
    """The one loader. An aigc model directory is verified first; with `require_metadata=False` a plain
    hub id or local `save_pretrained` directory (a base model) loads too, still safetensors-only."""
    path = str(path)
    is_aigc = os.path.isfile(os.path.join(path, METADATA))
    if is_aigc:
        meta = verify_model_dir(path)
    elif require_metadata:
        raise ModelDirError(f"{path}: not an aigc model directory (no {METADATA}); export one with aigc first")
    else:
        meta = {}
        if os.path.isdir(path):
            unsafe = [p.name for p in Path(path).iterdir() if p.suffix in UNSAFE_SUFFIXES]
            if unsafe and not any(p.suffix == ".safetensors" for p in Path(path).iterdir()):
                raise ModelDirError(f"{path}: only pickle-based weights {unsafe}; convert them to safetensors")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=dtype or "auto")
    except OSError as e:
        raise ModelDirError(f"{path}: cannot load with transformers: {e}") from None
    if tokenizer.pad_token is None:  # GPT-2 ships without one; batching needs it
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model.to(device).eval(), tokenizer, meta, path)


def copy_model_dir(src: str | os.PathLike, dst: str | os.PathLike, **extra_meta: Any) -> Path:
    """Verify `src`, copy it to `dst` atomically, and add `extra_meta` to its metadata (re-checksummed)."""
    meta = verify_model_dir(src)
    out = Path(dst)
    tmp = _temp_sibling(out)
    try:
        shutil.copytree(src, tmp)
        if extra_meta:
            meta.update(extra_meta)
            (tmp / METADATA).write_text(json.dumps(meta, indent=2, default=str))
        verify_model_dir(tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def fingerprint(meta: dict[str, Any]) -> str:
    """A model directory's identity from its files' checksums in aigc.json (not the metadata, which grows when an
    evaluation is recorded): what Serve answers as `system_fingerprint` and the registry tags a version with."""
    files = json.dumps(meta.get("files", {}), sort_keys=True).encode()
    return "fp_" + hashlib.sha256(files).hexdigest()[:12]
