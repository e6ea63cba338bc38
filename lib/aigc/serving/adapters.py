"""Which LoRA adapters an app serves on its base: the listed directories and the adapter folder's, found by
name, and checked against the base's fingerprint (what each adapter recorded of the weights it was trained on).

No Ray or FastAPI: the app builder, the router and the replicas each use these, and the unit tests call them
directly. The adapters' own loading onto the base is `aigc.serving.engine.AdapterHost`'s.
"""

from __future__ import annotations

import os
from typing import Any

from aigc.config import expand
from aigc.modeldir import ModelDirError, fingerprint, read_metadata
from aigc.serving.args import ADAPTER_NAME, ServeArgs, adapter_name


def listed(args: ServeArgs) -> dict[str, str]:
    """name -> directory of the `adapters` the args list (each named by its directory)."""
    return {adapter_name(p): expand(p) for p in args.adapters}


def folder_names(args: ServeArgs) -> list[str]:
    """The adapter folder's adapters now (sub-directories holding aigc.json; hidden ones, such as a copy still
    being written, are not), sorted; [] without a folder or while it does not exist."""
    folder = expand(args.adapter_folder) if args.adapter_folder else None
    if not folder or not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if ADAPTER_NAME.fullmatch(n)
                  and os.path.isfile(os.path.join(folder, n, "aigc.json")))


def available(args: ServeArgs) -> dict[str, str]:
    """name -> directory of every adapter served now: the listed ones, then the folder's (a listed one wins)."""
    out = listed(args)
    folder = expand(args.adapter_folder) if args.adapter_folder else ""
    for n in folder_names(args):
        out.setdefault(n, os.path.join(folder, n))
    return out


def find(args: ServeArgs, name: str) -> str | None:
    """The directory of adapter `name`, or None when the app serves no such adapter (looked up in the folder
    now, so one copied in after the deploy is found)."""
    if name in (got := listed(args)):
        return got[name]
    if args.adapter_folder and ADAPTER_NAME.fullmatch(name):
        path = os.path.join(expand(args.adapter_folder), name)
        if os.path.isfile(os.path.join(path, "aigc.json")):
            return path
    return None


def adapter_meta(path: str, base_fingerprint: str, base: str) -> dict[str, Any]:
    """aigc.json of adapter directory `path` once it holds an adapter for the base whose weights have
    `base_fingerprint` (`base`: how that base is named in a message); a ModelDirError naming both fingerprints
    otherwise. The checksums are verified where the adapter loads (`aigc.modeldir.load_adapter`)."""
    meta = read_metadata(path)
    ad = meta.get("adapter")
    if not ad:
        raise ModelDirError(f"{path}: holds no LoRA adapter (no 'adapter' in aigc.json)")
    recorded = ad["base"]
    if recorded["fingerprint"] != base_fingerprint:
        raise ModelDirError(
            f"{path}: adapter trained on base {recorded['name_or_path']} (fingerprint {recorded['fingerprint'][:16]}"
            f"...), but the served base {base} has fingerprint {base_fingerprint[:16]}...: not the same weights")
    return meta


def problems(args: ServeArgs) -> list[str]:
    """Every served adapter this machine can see checked against the base before anything is deployed, each
    problem named by its key. Paths it cannot see (a cluster's shared storage) are the replicas' to check."""
    base = expand(args.model_dir)
    if not args.serves_adapters or "://" in base or not os.path.isdir(base):
        return []
    out, base_fp = [], None
    try:
        base_fp = fingerprint(base)
    except ModelDirError as e:
        return [f"model_dir: {e} (a base that serves adapters needs its full weights)"]
    # a folder that does not exist yet serves no adapter yet (the pipeline's deploy_adapter creates it)
    folder = expand(args.adapter_folder) if args.adapter_folder else None
    keyed = [(f"adapters[{i}]", expand(p)) for i, p in enumerate(args.adapters)]
    keyed += [(f"adapter_folder/{n}", os.path.join(folder or "", n)) for n in folder_names(args)]
    for key, path in keyed:
        if "://" in path or not os.path.isdir(os.path.dirname(path)):
            continue
        try:
            adapter_meta(path, base_fp, base)
        except ModelDirError as e:
            out.append(f"{key}: {e}")
    return out
