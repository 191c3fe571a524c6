"""Checks of a stage's inputs before any work: a missing, truncated or garbled file is named with the
command that restores it (the committed model: ``git checkout``; the data: ``dvc repro data``).

* model folder: ``config.json`` is JSON; every ``*.safetensors`` has a complete header and exactly the
  bytes its header promises (a truncated file fails here, not as ``SafetensorError: incomplete metadata``);
* testbed data: ``card.json``; every Arrow file reads completely (not ``OSError: Expected to be able
  to read N bytes``); every image decodes with a valid checksum (PIL ``verify``: PNG CRCs). About 0.2 s
  for the whole testbed.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path


class InputError(FileNotFoundError):
    """A stage input is missing or corrupt; the message names the file and how to restore it."""


def model_restore(folder) -> str:
    return (f"restore the committed model with `git checkout -- {folder}` (or retrain it: see docs/pipeline.md, "
            "`train` is frozen)")


def data_restore(folder) -> str:
    return f"regenerate the data with `dvc repro data` (or `python -m pipeline.data --out {folder}`)"


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is incomplete, or None: 8-byte header length, JSON header, data size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than the 8-byte header length"
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            return f"truncated: header of {length} bytes, file of {size} bytes"
        try:
            header = json.loads(f.read(length))
        except ValueError as error:
            return f"header is not JSON ({error})"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        return f"{'truncated' if size < expected else 'too long'}: {size} bytes where the header describes {expected}"
    return None


def check_model(folder) -> None:
    """Raise :class:`InputError` naming the first missing or corrupt file of a model folder."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise InputError(f"model folder {str(folder)!r} not found (no config.json); {model_restore(folder)}")
    try:
        json.loads(config.read_text())
    except ValueError as error:
        raise InputError(f"{config} is not valid JSON ({error}); {model_restore(folder)}") from None
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not list(folder.glob("*.bin")):
        raise InputError(f"model folder {folder} has no weights (*.safetensors); {model_restore(folder)}")
    for path in weights:
        problem = safetensors_problem(path)
        if problem:
            raise InputError(f"{path} is corrupt ({problem}); {model_restore(folder)}")


def check_data(folder) -> None:
    """Raise :class:`InputError` naming the first missing or corrupt file of the testbed data."""
    import pyarrow as pa
    from PIL import Image

    folder = Path(folder)
    if not (folder / "card.json").is_file() or not (folder / "tasks").is_dir():
        raise InputError(f"testbed data {str(folder)!r} not found (no card.json or tasks/); {data_restore(folder)}")
    arrows = sorted(folder.glob("**/*.arrow"))
    if not arrows:
        raise InputError(f"testbed data {folder} has no Arrow files; {data_restore(folder)}")
    for path in arrows:
        try:
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_stream(source).read_all()
        except (OSError, pa.ArrowException) as error:
            raise InputError(f"{path} is corrupt ({type(error).__name__}: {error}); {data_restore(folder)}") from None
        for name in table.column_names:
            if not pa.types.is_struct(table.schema.field(name).type) or "bytes" not in [
                    f.name for f in table.schema.field(name).type]:
                continue
            for row, cell in enumerate(table.column(name).to_pylist()):
                try:
                    Image.open(io.BytesIO(cell["bytes"])).verify()
                except Exception as error:  # noqa: BLE001 - PIL raises many kinds for garbled bytes
                    raise InputError(f"{path}: the image of row {row} ({name!r}) does not decode "
                                     f"({type(error).__name__}: {error}); {data_restore(folder)}") from None
