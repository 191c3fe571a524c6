"""What the paper profile's stages share: the models of ``paper.models``, whether each checkpoint is here,
skipping an absent one by name, loading one on ``paper.device``, and the profile's output folders.

A model is *available* when its ``pretrained`` is a local folder or a hub id already in the Hugging Face
cache (the hub itself is never asked: ``HF_HUB_OFFLINE`` style). The ``checkpoints`` stage writes what it
found to ``<paper.dir>/outputs/checkpoints/<model>/checkpoint.json``; every other stage of that model
depends on the record, so a checkpoint that appears later (or a new revision) reruns exactly its entries.
A stage of an absent model writes ``skipped.json`` (model, checkpoint, reason) as its output and logs
``skipped <model>: ...``; the results and the report name every skipped model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from ._common import StageError, write_json

log = logging.getLogger("pipeline")
SKIPPED = "skipped.json"


def outputs_dir(params: dict) -> Path:
    """``<paper.dir>/outputs``: where the profile's stages write."""
    return Path(params["paper"]["dir"]) / "outputs"


def spec(params: dict, name: str) -> dict:
    """``paper.models.<name>``; names the choices when ``name`` is not one of them."""
    models = params["paper"]["models"]
    if name not in models:
        raise StageError(f"model {name!r} is not one of params paper.models {list(models)}")
    return models[name]


def resolve(name: str, model: dict) -> dict:
    """Where ``model``'s checkpoint is, without downloading: ``{"model", "pretrained", "architecture",
    "budgets", "available", "path", "revision", "reason"}`` (revision: the hub snapshot's commit, or a
    hash of a local folder's config.json and weight index)."""
    from huggingface_hub import try_to_load_from_cache

    record = {"model": name, **{k: model.get(k) for k in ("pretrained", "architecture", "budgets", "estimator")},
              "available": False, "path": None, "revision": None, "reason": None}
    pretrained = model["pretrained"]
    folder = Path(pretrained).expanduser()
    if folder.is_dir():
        config = folder / "config.json"
        if not config.exists():
            record["reason"] = f"local folder {pretrained!r} has no config.json"
            return record
        digest = hashlib.sha256()
        for part in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors"))[:1]:
            digest.update(part.name.encode() + part.read_bytes()[:1 << 20])
        record.update(available=True, path=str(folder.resolve()), revision=f"local:{digest.hexdigest()[:16]}")
    elif folder.is_absolute() or pretrained.startswith(".") or pretrained.count("/") > 1:
        record["reason"] = f"local folder {pretrained!r} not found"
        return record
    else:
        try:
            found = try_to_load_from_cache(pretrained, "config.json")
        except ValueError as error:  # not a hub id either (huggingface_hub's HFValidationError)
            record["reason"] = f"{pretrained!r} is neither a local folder nor a hub id ({error})"
            return record
        if not isinstance(found, str):
            record["reason"] = (f"checkpoint {pretrained!r} is neither a local folder nor in the Hugging Face cache "
                                "(download it first: `hf download " + pretrained + "`; HF_HOME says where the cache is)")
            return record
        snapshot = Path(found).parent
        record.update(available=True, path=str(snapshot), revision=snapshot.name)
    architectures = json.loads((Path(record["path"]) / "config.json").read_text()).get("architectures") or []
    if model.get("architecture") not in architectures:
        record.update(available=False, reason=f"checkpoint {pretrained!r} is a {architectures or 'model of no named class'}, "
                                              f"params say {model.get('architecture')!r}")
    return record


def availability(params: dict, name: str) -> dict:
    """The checkpoint record of ``name`` (resolved now: a stage may run outside DVC)."""
    return resolve(name, spec(params, name))


def skip(out: Path, record: dict, stage: str) -> None:
    """Write the output of a stage whose model is absent: ``skipped.json``, and say so."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SKIPPED, {"stage": stage, **record})
    log.warning("skipped %s (%s): %s", record["model"], stage, record["reason"])


def skipped(folder) -> dict | None:
    """The skip record of a stage output folder, or None when it holds results."""
    path = Path(folder) / SKIPPED
    return json.loads(path.read_text()) if path.exists() else None


def torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def load(params: dict, name: str, record: dict | None = None):
    """(model in eval mode on ``paper.device``, processor) of an available model, with the model's own
    attention implementation (never switched here). Qwen2.5-VL's processor without its video half when
    torchvision is missing (transformers' video processors import it)."""
    import transformers

    from ._common import limit_threads

    limit_threads()
    record = record or availability(params, name)
    if not record["available"]:
        raise StageError(f"model {name!r}: {record['reason']}")
    paper = params["paper"]
    cls = getattr(transformers, record["architecture"])
    model = cls.from_pretrained(record["path"], dtype=torch_dtype(paper["dtype"])).to(paper["device"]).eval()
    try:
        processor = transformers.AutoProcessor.from_pretrained(record["path"])
    except ImportError:
        if not record["architecture"].startswith("Qwen2_5_VL"):
            raise
        from zoo_prune.tiny import QwenProcessorWithoutVideo

        chat = Path(record["path"]) / "chat_template.jinja"
        processor = QwenProcessorWithoutVideo(image_processor=transformers.AutoImageProcessor.from_pretrained(record["path"]),
                                              tokenizer=transformers.AutoTokenizer.from_pretrained(record["path"]),
                                              chat_template=chat.read_text() if chat.exists() else None)
    return model, processor


def task_documents(params: dict, task: str, limit: int):
    """The first ``limit`` documents of lmms-eval task ``task`` (its own YAML: dataset, split, ``doc_to_visual``,
    ``doc_to_text``), as ``[(images, question)]``: the stages that measure features (sensitivity, proxy,
    efficiency) read the benchmark's own images the way lmms-eval would feed them."""
    from zoo_prune.evaluation import task_documents as documents

    return documents(task, limit, include_path=params["paper"]["include_path"])


REHEARSAL = "RANDOM-WEIGHT REHEARSAL"


def random_weights(record: dict) -> bool:
    """Whether a checkpoint is a random-weight stand-in (``zoo_prune.rehearsal.checkpoints`` writes a README
    that says so): then every table and figure made from it carries :data:`REHEARSAL` on its face."""
    if not record.get("available") or not record.get("path"):
        return False
    readme = Path(record["path"]) / "README.md"
    return readme.exists() and "RANDOM WEIGHTS" in readme.read_text().splitlines()[0]


def weights_note(records) -> str:
    """'' when every model of ``records`` (checkpoint records) has real weights, else the banner and which are stand-ins."""
    records = [records] if isinstance(records, dict) else list(records)
    standins = [r["model"] for r in records if random_weights(r)]
    return f"{REHEARSAL}: {', '.join(standins)} {'is a' if len(standins) == 1 else 'are'} random-weight stand-in" \
           f"{'' if len(standins) == 1 else 's'} (zoo_prune.rehearsal), not the paper's checkpoint{'' if len(standins) == 1 else 's'}: " \
           "plumbing, not results" if standins else ""


def noted(table, note: str):
    """``table`` (a DataFrame) with a ``note`` column when ``note`` (:func:`weights_note`) says a stand-in made it."""
    return table.assign(note=note) if note else table


def records(params: dict, names=None) -> dict[str, dict]:
    """Checkpoint records of ``names`` (default: every model of ``paper.models``), resolved now."""
    return {name: availability(params, name) for name in (names or params["paper"]["models"])}
