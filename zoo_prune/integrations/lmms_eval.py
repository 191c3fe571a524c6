"""lmms-eval model ``zoo_prune``: lmms-eval's own ``llava_hf`` / ``qwen2_5_vl`` models with :func:`apply_pruning`.

Registered through the ``lmms_eval.models`` entry point of this package (pyproject.toml)::

    python -m lmms_eval --model zoo_prune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=zoo,keep=64,m=64,h=0.01 --tasks pope ...

``pretrained`` is a local folder or a hub id; its config's ``model_type`` picks the backend:
``llava`` / ``llava_next`` -> lmms-eval's chat ``llava_hf``, ``qwen2_5_vl`` -> its chat ``qwen2_5_vl``
(which needs ``qwen-vl-utils``, and that package imports torchvision). The backend loads the model
and builds prompts exactly as ``--model llava_hf`` / ``--model qwen2_5_vl`` do; then
``apply_pruning(model, method, keep, **options)`` is installed on its Hugging Face model.

Model arguments besides the backend's own:

* ``method`` (``zoo``; ``none`` = unpruned), ``keep`` (count or ratio; ``keep=1.0`` = unpruned) and
  the method's options (``m``, ``h``, ``seed``, ``estimator``, ``rank``, ...), which go to
  ``apply_pruning`` (it names any unknown one);
* ``resume_cache=DIR``: every answer is stored as soon as it is generated (lmms-eval's SQLite
  ``ResponseCache``, one database per rank under ``DIR/<model key>/``), keyed on the model
  arguments (``pretrained``, its weights' sizes and times, ``method``, ``keep``, every option), the
  task's dataset fingerprint, the prompt and the generation settings. An interrupted run started
  again with the same arguments and number of processes reuses the stored answers.
  (lmms-eval's ``--use_cache`` stores a run's answers only when the whole run is done.)

Generation errors fail the run: ``llava_hf`` turns an exception of ``generate`` into an empty
answer, which would be scored silently; here the run stops with the error instead.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import io
import json
import os
import types
from importlib.metadata import version
from pathlib import Path

from lmms_eval.api.model import lmms
from lmms_eval.caching.response_cache import ResponseCache
from loguru import logger
from tqdm.auto import tqdm

from ..methods import get_method
from ..pruned_model import apply_pruning

MODEL_NAME = "zoo_prune"
BACKENDS = {"llava": "llava_hf", "llava_next": "llava_hf", "qwen2_5_vl": "qwen2_5_vl"}
UNPRUNED = ("none", None)
PER_CALL_LOG = "lmms_eval.models.model_utils.gen_metrics"
# Model arguments that change where or how fast answers are computed, not what they are.
NOT_IN_CACHE_KEY = ("resume_cache", "device", "device_map", "batch_size", "max_batch_size")


def manifests():
    """The ``lmms_eval.models`` entry point: ``zoo_prune`` -> :class:`ZooPrune` (a chat model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_NAME, chat_class_path=f"{__name__}.ZooPrune")]


def model_type(pretrained: str) -> str:
    """The ``model_type`` of the config of ``pretrained`` (a folder or hub id)."""
    from transformers import AutoConfig

    path = Path(pretrained).expanduser()
    if not path.is_dir() and (pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1 or path.exists()):
        raise FileNotFoundError(f"pretrained={pretrained!r} is not a model folder (nor a hub id)")
    return AutoConfig.from_pretrained(pretrained).model_type


@functools.cache
def backend_class(model_type: str) -> type:
    """``ZooPrune`` on top of lmms-eval's chat model for ``model_type`` (imported only when needed)."""
    if model_type not in BACKENDS:
        raise ValueError(f"zoo_prune has no lmms-eval backend for model_type {model_type!r}; "
                         f"supported: {', '.join(BACKENDS)}")
    if BACKENDS[model_type] == "llava_hf":
        from lmms_eval.models.chat.llava_hf import LlavaHf as base
    else:
        from lmms_eval.models.chat import qwen2_5_vl

        if not qwen2_5_vl._has_qwen_vl:
            raise ImportError(
                f"model_type {model_type!r} runs on lmms-eval's qwen2_5_vl, which needs qwen-vl-utils "
                "(pip install qwen-vl-utils; it imports torchvision, so install the torchvision build matching torch)"
            )
        base = qwen2_5_vl.Qwen2_5_VL
    return type(f"ZooPrune{base.__name__}", (ZooPrune, base), {"__module__": __name__, "__doc__": ZooPrune.__doc__})


def weights_stamp(pretrained: str) -> str:
    """For a local folder: config.json and the names, sizes and times of its weight files (retraining
    invalidates cached answers); for a hub id: ''."""
    folder = Path(pretrained)
    if not folder.is_dir():
        return ""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    return json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])


class ZooPrune(lmms):
    """lmms-eval model ``zoo_prune``: an lmms-eval VLM backend with visual-token pruning (module docstring).

    ``ZooPrune(pretrained=..., ...)`` returns an instance of :func:`backend_class` for the checkpoint's
    model type; ``self.pruning`` is the :class:`PruningHandle` (None when unpruned), whose
    ``kept_indices`` are those of the last image.
    """

    is_simple = False

    def __new__(cls, pretrained: str = "llava-hf/llava-1.5-7b-hf", **kwargs):
        if cls is ZooPrune:
            cls = backend_class(model_type(pretrained))
        return super().__new__(cls)

    def __init__(self, pretrained: str = "llava-hf/llava-1.5-7b-hf", method: str = "zoo", keep: int | float = 64,
                 resume_cache: str | None = None, **kwargs):
        base = type(self).__mro__[type(self).__mro__.index(ZooPrune) + 1]
        accepted = [name for name, p in inspect.signature(base.__init__).parameters.items()
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "self"]
        backend = {k: v for k, v in kwargs.items() if k in accepted}
        options = {k: v for k, v in kwargs.items() if k not in accepted}
        one_process = int(os.environ.get("WORLD_SIZE", 1)) == 1  # several: the backend puts rank r on cuda:r
        if "device_map" in accepted and backend.get("device_map") in (None, "") and one_process:
            backend["device_map"] = backend.get("device") or "cuda"  # llava_hf's default "" fails under transformers 5
        super().__init__(pretrained=pretrained, **backend)
        self.method, self.keep, self.options = method, keep, options
        self.pruning = None
        if method in UNPRUNED:
            if options:
                raise ValueError(f"unknown zoo_prune model argument(s) {options} (method={method!r} prunes nothing)")
        elif isinstance(keep, float) and keep == 1.0:
            get_method(method, **options)  # unpruned, but the options are checked
        else:
            self.pruning = apply_pruning(self.model, method, keep, **options)
        key = {"pretrained": pretrained, "weights": weights_stamp(pretrained), "method": method, "keep": keep,
               **{k: v for k, v in {**backend, **options}.items() if k not in NOT_IN_CACHE_KEY}}
        self.cache_key = json.dumps(key, sort_keys=True, default=str)
        self.resume_dir = resume_cache and Path(resume_cache) / hashlib.sha256(self.cache_key.encode()).hexdigest()[:16]
        self._resume = None
        self._generation_error = None
        self._raise_generation_errors()

    def _raise_generation_errors(self) -> None:
        """Record an exception of the HF model's ``generate`` (the backend may swallow it)."""
        generate = self.model.generate

        @functools.wraps(generate)
        def checked(*args, **kwargs):
            try:
                return generate(*args, **kwargs)
            except Exception as error:
                self._generation_error = error
                raise

        self.model.generate = checked

    def _backend_generate(self, requests: list) -> list:
        """The backend's ``generate_until``; raises if the model's ``generate`` raised inside it."""
        answers = super().generate_until(requests)
        if self._generation_error is not None:
            error, self._generation_error = self._generation_error, None
            raise RuntimeError(f"generation failed in zoo_prune ({self.cache_key}): {error!r}") from error
        return answers

    def answer_store(self) -> ResponseCache | None:
        """This rank's answer store under ``resume_dir`` (opened on first use, when ``task_dict`` is set)."""
        if self._resume is None and self.resume_dir is not None:
            datasets = {task: json.dumps({split: getattr(data, "_fingerprint", "") for split, data in splits.items()})
                        for task, splits in self.task_dict.items()}
            fingerprints = {task: hashlib.sha256(text.encode()).hexdigest()[:16] for task, text in datasets.items()}
            path = self.resume_dir / f"rank_{self.rank}"
            self._resume = ResumeCache(f"{path}.db", f"{path}.audit.jsonl", model_fingerprint=self.cache_key,
                                       task_fingerprints=fingerprints, eval_version=version("lmms_eval"))
            (self.resume_dir / "model_args.json").write_text(self.cache_key + "\n")
        return self._resume

    def generate_until(self, requests: list) -> list:
        """Answers of ``requests``; with ``resume_cache``, one request at a time, each stored when done."""
        cache = self.answer_store()
        if cache is None:
            return self._backend_generate(requests)
        backend = types.SimpleNamespace(generate_until=self._backend_generate)
        answers = []
        logger.disable(PER_CALL_LOG)  # the backend's throughput line per call (the final table still counts them)
        try:
            for request in tqdm(requests, desc="zoo_prune answering", disable=self.rank != 0):
                with contextlib.redirect_stderr(io.StringIO()):  # the backend's progress bar of one request
                    answers += cache.execute(backend, "generate_until", [request])
        finally:
            logger.enable(PER_CALL_LOG)
        cache.report(self.rank)
        return answers


class ResumeCache(ResponseCache):
    """lmms-eval's response cache, used per answer. An empty answer is stored too: errors raise
    (``ZooPrune._backend_generate``), so an empty string is what the model said."""

    @staticmethod
    def _is_valid_response(response, request_type: str) -> bool:
        return response is not None

    def report(self, rank: int) -> None:
        """One line with this run's reused and computed answers (the kill / resume check reads it)."""
        stats = self.get_stats()
        print(f"zoo_prune resume cache (rank {rank}): {stats['hits']} answers reused, {stats['misses']} computed, "
              f"{stats['total_cached_entries']} stored in {self.db_path}", flush=True)
