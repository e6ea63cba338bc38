"""One model-directory format and one loader.

A model directory is what `transformers.AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)` load (config, safetensors weights, tokenizer files), plus
`aigc.json`: the training config, the metrics, the step, and a sha256 for every other file.
Evaluation, search export and serving all load through :func:`load_model`, which verifies the
checksums and refuses pickled weights.

A LoRA run's directory also holds its adapter in `adapter/` (`adapter_config.json`,
`adapter_model.safetensors`: `PeftModel.from_pretrained(base, f"{dir}/adapter")`) and records in
aigc.json the base it applies to, with that base's :func:`fingerprint`. Merged (the default), the
top level is the full model as above; adapter-only, :func:`load_model` loads the recorded base
(fingerprint verified) and applies the adapter. The adapter sits in a subfolder because
transformers, finding `adapter_config.json` beside `config.json`, would apply it again on top of
the merged weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM, AutoTokenizer

from aigc import storage

METADATA = "aigc.json"
FORMAT = "aigc-model/1"
# Pickle-based formats run code on load; a served model must never need them.
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".h5", ".msgpack")
ADAPTER_DIR = "adapter"  # a LoRA adapter's files, inside a model directory
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The full model's weight files (one, or transformers' shards); what a base's fingerprint covers.
WEIGHT_FILE = re.compile(r"model(-\d+-of-\d+)?\.safetensors")
logger = logging.getLogger(__name__)

MODEL_CACHE = "~/.cache/aigc/models"  # this node's verified copies of object-store model directories
# How many copies MODEL_CACHE keeps, the most recently used (0: all). A served adapter under vLLM adds a full merged
# model per version, and a refreshed winner a copy per promotion: without a bound a serving node's disk fills.
CACHE_KEEP_ENV = "AIGC_MODEL_CACHE_KEEP"
CACHE_KEEP_DEFAULT = 8
STALE_PARTIAL_S = 24 * 3600  # a temp folder this old was left by a killed download or merge


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


def local_dir(path: str | os.PathLike) -> str:
    """`path` itself, or for an object-store URI (a published model directory, `aigc.storage`) this node's verified
    copy in MODEL_CACHE, keyed by the files' fingerprint and its aigc.json (an identical model recorded with other
    provenance, or with its evaluation added, is another copy): downloaded once into a temp folder, verified,
    then renamed, so a partial download is never used. Every reader of a model directory goes through here (the
    loader, `fingerprint`, Serve replicas), so a run stored in a bucket needs no shared disk."""
    path = str(path)
    if not storage.is_uri(path):
        return path
    storage.published_files(path)  # no marker: not (yet) a complete directory
    raw = storage.read_bytes(storage.join(path, METADATA))
    key = f"{files_fingerprint(json.loads(raw))}-{hashlib.sha256(raw).hexdigest()[:8]}"
    cache = Path(os.path.expanduser(MODEL_CACHE)) / key
    return _used(storage.fetch_dir(path, cache, verify=verify_model_dir))


def cache_keep() -> int:
    """MODEL_CACHE's bound: AIGC_MODEL_CACHE_KEEP copies (default 8; 0 keeps all)."""
    raw = os.environ.get(CACHE_KEEP_ENV, str(CACHE_KEEP_DEFAULT))
    try:
        keep = int(raw)
    except ValueError:
        keep = -1
    if keep < 0:
        raise ModelDirError(f"{CACHE_KEEP_ENV}={raw!r}: must be a whole number of model copies to keep (0: all)")
    return keep


def _used(entry: Path) -> str:
    """`entry`, a copy in MODEL_CACHE, marked as just used (its mtime), then the cache pruned (`prune_cache`)."""
    try:
        os.utime(entry)
    except OSError:
        pass
    prune_cache(cache_keep(), spare=entry)
    return str(entry)


def prune_cache(keep: int, spare: Path | None = None) -> list[str]:
    """Delete all but the `keep` most recently used copies in MODEL_CACHE (object-store copies and merged adapters
    alike; 0 keeps all), never `spare`, and temp folders left for a day by a killed download or merge. A reader
    marks a copy used when it takes it (`local_dir`, `merged_copy`), so a copy a replica is loading is the newest.
    Returns the names deleted."""
    root = Path(os.path.expanduser(MODEL_CACHE))
    try:
        entries = [(e.stat().st_mtime, e) for e in root.iterdir() if e.is_dir()]
    except OSError:
        return []
    now, gone = time.time(), []
    copies = sorted(((t, e) for t, e in entries if not e.name.startswith(".")), key=lambda te: te[0], reverse=True)
    old = [e for _, e in copies[keep:]] if keep else []
    old += [e for t, e in entries if e.name.startswith(".") and now - t > STALE_PARTIAL_S]
    for e in old:
        if spare is not None and e.name == spare.name:
            continue
        shutil.rmtree(e, ignore_errors=True)
        gone.append(e.name)
    if gone:
        logger.info("model cache %s: removed %d least recently used or stale entr%s (%s=%d): %s", root, len(gone),
                    "y" if len(gone) == 1 else "ies", CACHE_KEEP_ENV, keep, ", ".join(sorted(gone)))
    return gone


def fingerprint(name_or_path: str | os.PathLike) -> str:
    """A model's identity: sha256 over its full-model safetensors files' names and sha256s (not the tokenizer
    or config, which re-saving may reformat). A hub id is read from the local Hugging Face cache, a URI from
    this node's verified copy. This is what an adapter records of its base; the embedded base's aigc.json
    `fingerprint` is its recipe's cache key."""
    root = Path(local_dir(name_or_path))
    if not root.is_dir():
        try:
            root = Path(snapshot_download(str(name_or_path), local_files_only=True))
        except Exception as e:  # not cached, or not a hub id: the message says which
            raise ModelDirError(f"{name_or_path}: neither a local directory nor a cached hub model ({e})") from None
    weights = sorted(p for p in root.iterdir() if WEIGHT_FILE.fullmatch(p.name))
    if not weights:
        raise ModelDirError(f"{name_or_path}: no full-model safetensors weights to fingerprint")
    h = hashlib.sha256()
    for p in weights:
        h.update(f"{p.name}\t{sha256_file(p)}\n".encode())
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


def _write_dir(out: Path, write: Callable[[Path], dict[str, Any]], *, config: dict[str, Any],
               metrics: dict[str, Any] | None, step: int, **extra: Any) -> Path:
    """`write(tmp)` fills a temp sibling (returning metadata to add), then checksums, and the directory moves
    into place atomically (readers never see a half-written one)."""
    tmp = _temp_sibling(out)
    try:
        more = write(tmp)
        unsafe = [p.name for p in _files(tmp) if p.suffix in UNSAFE_SUFFIXES]
        if unsafe:  # save_pretrained writes safetensors in transformers 5; guard against a silent change
            raise ModelDirError(f"{out}: refusing to write non-safetensors weights {unsafe}")
        write_metadata(tmp, config=config, metrics=metrics or {}, step=step, **more, **extra)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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
    """Write `model` + `tokenizer` as a model directory, atomically."""
    def write(tmp: Path) -> dict[str, Any]:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return {}

    return _write_dir(Path(out_dir), write, config=config, metrics=metrics, step=step, **extra)


def save_adapter_dir(
    peft_model: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    base: str,
    merge: bool,
    config: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    step: int = 0,
    **extra: Any,
) -> Path:
    """Write a LoRA model directory from a `peft.PeftModel` whose tensors are whole (consolidated, not ZeRO
    shards): the adapter in `adapter/`, the tokenizer, with `merge` the merged full model at the top level,
    and in aigc.json `adapter` = {path, merged, base: {name_or_path, fingerprint}, r, alpha, target_modules,
    params, bytes}. `base` is what the adapter applies to (a path or hub id). The model is merged in place."""
    base_fp = fingerprint(base)

    def write(tmp: Path) -> dict[str, Any]:
        peft_model.save_pretrained(tmp / ADAPTER_DIR)
        (tmp / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # peft's model card template, nothing of ours
        tokenizer.save_pretrained(tmp)
        if merge:
            peft_model.merge_and_unload().save_pretrained(tmp)
        lc = next(iter(peft_model.peft_config.values()))
        return {"adapter": {
            "path": ADAPTER_DIR, "merged": merge, "base": {"name_or_path": str(base), "fingerprint": base_fp},
            "r": lc.r, "alpha": lc.lora_alpha, "target_modules": sorted(lc.target_modules),
            "params": sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n or "modules_to_save" in n),
            "bytes": (tmp / ADAPTER_DIR / ADAPTER_WEIGHTS).stat().st_size,
        }}

    return _write_dir(Path(out_dir), write, config=config, metrics=metrics, step=step, **extra)


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


def check_adapter_base(meta: dict[str, Any], base: str | os.PathLike, where: str = "") -> str:
    """The fingerprint of `base`, which must be the one the adapter recorded in `meta` (its aigc.json);
    a ModelDirError naming both fingerprints otherwise."""
    recorded = meta["adapter"]["base"]
    actual = fingerprint(base)
    if actual != recorded["fingerprint"]:
        raise ModelDirError(
            f"{where or 'adapter'}: trained on base {recorded['name_or_path']} (fingerprint "
            f"{recorded['fingerprint'][:16]}...), but {base} has fingerprint {actual[:16]}...: not the same weights")
    return actual


def load_adapter(model: Any, adapter_dir: str | os.PathLike, *, adapter_name: str = "default",
                 base_fingerprint: str | None = None, is_trainable: bool = False) -> Any:
    """Attach the adapter of a verified model directory to `model` (a base model, or a `PeftModel` that gets
    one more named adapter) and return the PeftModel. With `base_fingerprint` (of `model`'s weights, from
    :func:`fingerprint`), an adapter recorded for another base is refused, both fingerprints named."""
    # peft on call: importing it costs ~2.6 s, and only adapter directories need it
    from peft import PeftModel

    meta = verify_model_dir(adapter_dir)
    ad = meta.get("adapter")
    if not ad:
        raise ModelDirError(f"{adapter_dir}: holds no LoRA adapter (no 'adapter' in {METADATA})")
    if base_fingerprint is not None and base_fingerprint != ad["base"]["fingerprint"]:
        raise ModelDirError(
            f"{adapter_dir}: adapter trained on base {ad['base']['name_or_path']} (fingerprint "
            f"{ad['base']['fingerprint'][:16]}...), but the model given has fingerprint {base_fingerprint[:16]}...")
    files = str(Path(adapter_dir) / ad["path"])
    if isinstance(model, PeftModel):
        model.load_adapter(files, adapter_name=adapter_name, is_trainable=is_trainable)
        return model
    return PeftModel.from_pretrained(model, files, adapter_name=adapter_name, is_trainable=is_trainable)


def load_model(
    path: str | os.PathLike,
    *,
    device: str = "cpu",
    dtype: Any = None,
    require_metadata: bool = True,
    base: str | os.PathLike | None = None,
    weights: bool = True,
) -> LoadedModel:
    """The one loader. An aigc model directory is verified first; with `require_metadata=False` a plain
    hub id or local `save_pretrained` directory (a base model) loads too, still safetensors-only.

    An adapter-only directory (exported with `export.merge: false`) loads its recorded base, or `base` when
    given, verifies that base's fingerprint against the recorded one, and returns the merged model. An
    object-store URI loads from this node's verified copy (`local_dir`) and keeps the URI as the model's name,
    so what a run records of its base (a LoRA adapter's) names the bucket, not one node's cache.

    `weights=False`: the same checks and the tokenizer, but no model (`model` is None): for an engine that loads
    the weights itself (vLLM) from `path`, which for an adapter-only directory is its merged copy on this node
    (`merged_copy`; `meta` stays the adapter directory's, so the served fingerprint is the same either way)."""
    uri = str(path) if storage.is_uri(path) else None
    path = local_dir(path)
    is_aigc = os.path.isfile(os.path.join(path, METADATA))
    if is_aigc:
        meta = verify_model_dir(path)
        ad = meta.get("adapter")
        if ad and not ad["merged"]:
            base = str(base or ad["base"]["name_or_path"])
            base_fp = check_adapter_base(meta, base, path)
            if not weights:
                merged = merged_copy(path, meta, base, base_fp)
                return LoadedModel(None, _tokenizer(merged), meta, merged)
            return LoadedModel(_merge_adapter(path, base, base_fp, device, dtype), _tokenizer(path), meta, path)
    elif require_metadata:
        raise ModelDirError(f"{path}: not an aigc model directory (no {METADATA}); export one with aigc first")
    else:
        meta = {}
        if os.path.isdir(path):
            unsafe = [p.name for p in Path(path).iterdir() if p.suffix in UNSAFE_SUFFIXES]
            if unsafe and not any(p.suffix == ".safetensors" for p in Path(path).iterdir()):
                raise ModelDirError(f"{path}: only pickle-based weights {unsafe}; convert them to safetensors")
    try:
        tokenizer = _tokenizer(path)
        if not weights:
            return LoadedModel(None, tokenizer, meta, path)
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=dtype or "auto")
    except OSError as e:
        raise ModelDirError(f"{path}: cannot load with transformers: {e}") from None
    if uri:
        model.config.name_or_path = model.name_or_path = uri
    return LoadedModel(model.to(device).eval(), tokenizer, meta, path)


def _merge_adapter(path: str, base: str, base_fp: str, device: str = "cpu", dtype: Any = None) -> Any:
    """The adapter-only directory `path` loaded onto `base`, whose fingerprint `base_fp` was checked, and merged."""
    on = load_model(base, device=device, dtype=dtype, require_metadata=False).model
    return load_adapter(on, path, base_fingerprint=base_fp).merge_and_unload().eval()


def merged_copy(path: str, meta: dict[str, Any], base: str, base_fp: str) -> str:
    """A full model directory of the adapter-only directory `path` merged onto `base` (fingerprint `base_fp`), for
    an engine that reads weights from disk and has no LoRA for the model (vLLM's GPT-2): built once per node in
    MODEL_CACHE, keyed by the adapter's files and the base's fingerprint, verified when reused. It carries the
    adapter directory's config, metrics and step, and `merged_from` names both."""
    out = Path(os.path.expanduser(MODEL_CACHE)) / f"merged-{files_fingerprint(meta)[3:]}-{base_fp[:12]}"
    damaged = False
    if out.is_dir():
        try:
            verify_model_dir(out)
            return _used(out)
        except ModelDirError:  # built again below, and then replaces it
            damaged = True
    model = _merge_adapter(path, base, base_fp)  # the adapter and base already checked by the caller
    tmp = _temp_sibling(out)
    try:
        save_model_dir(model, _tokenizer(path), tmp, config=meta.get("config", {}), metrics=meta.get("metrics", {}),
                       step=meta.get("step", 0), merged_from={"adapter": files_fingerprint(meta), "path": str(path),
                                                              "base": base, "base_fingerprint": base_fp})
        if damaged:
            _replace_dir(tmp, out)
        else:
            try:
                os.replace(tmp, out)
            except OSError:  # another replica on this node built the same copy first: its content is the same
                if not out.is_dir():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _used(out)


def _tokenizer(path: str) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # GPT-2 ships without one; batching needs it
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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


def files_fingerprint(meta: dict[str, Any]) -> str:
    """A model directory's short identity from all its files' checksums in aigc.json (`fingerprint` covers only a
    model's full weights, so that it also names a plain base or an adapter's base) (not the metadata, which grows when an
    evaluation is recorded): what Serve answers as `system_fingerprint` and the registry tags a version with."""
    files = json.dumps(meta.get("files", {}), sort_keys=True).encode()
    return "fp_" + hashlib.sha256(files).hexdigest()[:12]
