"""Content fingerprints of model folders, for caches keyed on what a model *is* rather than when its files were written.

    weights_fingerprint("models/testbed-llava")   # sha256 over config.json and the weight files' contents

Hashing a checkpoint is read once per file version: each file's digest is remembered in a small
sidecar JSON (``$ZOO_PRUNE_FINGERPRINTS``, default ``~/.cache/zoo_prune/fingerprints.json``) under its
resolved path with its (size, mtime_ns); a file whose size or mtime changed (a checkout, ``touch``,
a retraining) is hashed again, and an unchanged content gives the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin")
CHUNK = 1 << 20


def sidecar_path() -> Path:
    return Path(os.environ.get("ZOO_PRUNE_FINGERPRINTS") or Path.home() / ".cache" / "zoo_prune" / "fingerprints.json")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _load(sidecar: Path) -> dict:
    try:
        return json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return {}


def _save(sidecar: Path, entries: dict) -> None:
    """Atomic write (a temporary file renamed), so concurrent runs never read half a file."""
    try:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=sidecar.parent, prefix=".fingerprints-", delete=False) as f:
            json.dump(entries, f, indent=0, sort_keys=True)
        os.replace(f.name, sidecar)
    except OSError:  # a read-only home: fingerprints still work, only slower next time
        pass


def cached_digests(paths: list[Path], sidecar: Path | None = None) -> dict[str, str]:
    """``{name: sha256}`` of ``paths``, each hashed only if its (size, mtime_ns) is not in the sidecar."""
    sidecar = sidecar or sidecar_path()
    entries = _load(sidecar)
    digests, changed = {}, False
    for path in paths:
        stat = path.stat()
        key = str(path.resolve())
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = entries.get(key)
        if not entry or entry.get("stamp") != stamp:
            entry = {"stamp": stamp, "sha256": file_digest(path)}
            entries[key] = entry
            changed = True
        digests[path.name] = entry["sha256"]
    if changed:
        _save(sidecar, entries)
    return digests


def weights_fingerprint(pretrained, sidecar: Path | None = None) -> str:
    """sha256 over the names and contents of ``config.json`` and the weight files of a local model folder;
    '' for anything else (a hub id: its revision is the key)."""
    folder = Path(pretrained)
    if not folder.is_dir():
        return ""
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"))
    digests = cached_digests(files, sidecar)
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()
