"""lmms-eval models with pruning: lmms-eval's own chat backends plus :func:`~zoo_prune.apply_pruning`.

Registered through the ``lmms_eval.models`` entry point of this package (pyproject.toml)::

    python -m lmms_eval --model zoo_prune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=zoo,keep=64,m=64,h=0.01 --tasks pope ...

One static class per backend: :class:`ZooPruneLlava` (lmms-eval's chat ``llava_hf``; LLaVA-1.5 and
LLaVA-NeXT) and ``ZooPruneQwen2_5_VL`` (its chat ``qwen2_5_vl``, in :mod:`.lmms_eval_qwen`, which
needs ``qwen-vl-utils``, and that package imports torchvision: requirements-rehearse.txt). They are also
registered under their own names (``zoo_prune_llava``, ``zoo_prune_qwen2_5_vl``); ``zoo_prune`` is
:class:`ZooPrune`, whose ``create_from_arg_string`` (what lmms-eval calls) picks the class from the
checkpoint config's ``model_type``. The backend loads the model and builds prompts exactly as
``--model llava_hf`` / ``--model qwen2_5_vl`` do; then the pruning handle is installed on its model.

Model arguments besides the backend's own:

* ``method`` (``zoo``; ``none`` = unpruned), ``keep`` (count or ratio; ``keep=1.0`` = unpruned) and
  the method's options (``m``, ``h``, ``seed``, ``estimator``, ``rank``, ...), which go to
  ``apply_pruning`` (it names any unknown one);
* ``import=module`` (several joined by ``+``): modules imported before the method is looked up, so
  that a method registered in your own code (``register_method``) runs from lmms-eval's command
  line: ``--model_args pretrained=...,import=my_methods,method=top_norm,keep=64``;
* ``batch_size`` (lmms-eval's ``--batch_size``): :class:`ZooPruneLlava` generates a batch of
  documents in one left-padded call (lmms-eval's ``llava_hf`` asserts batch size 1); the answers
  equal batch size 1's (tests/test_lmms_eval.py);
* ``resume_cache=DIR``: every answer is stored as soon as its batch is generated (lmms-eval's SQLite
  ``ResponseCache``, one database per rank under ``DIR/<model key>/``), keyed on the model
  arguments (``pretrained``, a hash of its weights' contents, ``method``, ``keep``, every option), the
  task's dataset fingerprint, the prompt and the generation settings. An interrupted run started
  again with the same arguments and number of processes reuses the stored answers.
  (lmms-eval's ``--use_cache`` stores a run's answers only when the whole run is done.)

A document that fails (text-only where the model needs an image, a corrupt image, a prompt too long)
is logged with its task and id and answered with an empty string, which lmms-eval scores as a wrong
answer, as its own backends do; the run goes on, and the failure is not stored in the resume cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import os
import traceback
from importlib.metadata import version
from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.caching.response_cache import ResponseCache
from lmms_eval.models.chat.llava_hf import LlavaHf
from lmms_eval.protocol import ChatMessages
from loguru import logger
from tqdm.auto import tqdm

from ..fingerprint import weights_fingerprint
from ..methods import get_method
from ..pruned_model import apply_pruning

MODEL_NAME = "zoo_prune"
UNPRUNED = ("none", None)
PER_CALL_LOG = "lmms_eval.models.model_utils.gen_metrics"
# Model arguments that change where or how fast answers are computed, not what they are.
NOT_IN_CACHE_KEY = ("resume_cache", "device", "device_map", "batch_size", "max_batch_size")
# model_type of a checkpoint's config -> the registered name of its class
BACKENDS = {"llava": "zoo_prune_llava", "llava_next": "zoo_prune_llava", "qwen2_5_vl": "zoo_prune_qwen2_5_vl"}


def manifests():
    """The ``lmms_eval.models`` entry point: ``zoo_prune`` and one name per backend class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_NAME, chat_class_path=f"{__name__}.ZooPrune"),
            ModelManifest(model_id="zoo_prune_llava", chat_class_path=f"{__name__}.ZooPruneLlava"),
            ModelManifest(model_id="zoo_prune_qwen2_5_vl", chat_class_path=f"{__package__}.lmms_eval_qwen.ZooPruneQwen2_5_VL")]


def model_type(pretrained: str) -> str:
    """The ``model_type`` of the config of ``pretrained`` (a folder or hub id)."""
    from transformers import AutoConfig

    path = Path(pretrained).expanduser()
    if not path.is_dir() and (pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1 or path.exists()):
        raise FileNotFoundError(f"pretrained={pretrained!r} is not a model folder (nor a hub id)")
    return AutoConfig.from_pretrained(pretrained).model_type


def backend_class(model_type: str) -> type:
    """The static class that serves checkpoints of ``model_type``."""
    if model_type not in BACKENDS:
        raise ValueError(f"zoo_prune has no lmms-eval backend for model_type {model_type!r}; supported: {', '.join(BACKENDS)}")
    if BACKENDS[model_type] == "zoo_prune_llava":
        return ZooPruneLlava
    from .lmms_eval_qwen import ZooPruneQwen2_5_VL

    return ZooPruneQwen2_5_VL


def weights_stamp(pretrained: str) -> str:
    """For a local folder: a hash of config.json and its weight files' contents (``zoo_prune.fingerprint``;
    retraining invalidates cached answers, a checkout or ``touch`` does not); for a hub id: ''."""
    return weights_fingerprint(pretrained)


class _Failed(str):
    """An empty answer standing for a failed document: scored as wrong, never stored for resuming."""


def share_cpu_processes(model) -> None:
    """Data parallelism over CPU processes (``accelerate launch`` with ``ACCELERATE_USE_CPU``: the rehearsal's
    "2 processes = 1" check). lmms-eval's backends shard documents over GPUs only (``cuda:<rank>``); on CPU
    they see one device and would each answer every document. Here each process takes its rank, so that
    lmms-eval's evaluator gives it its share of the documents and gathers the answers, as on GPUs."""
    state = getattr(model, "accelerator", None)
    if (state is not None and state.num_processes > 1 and model.world_size == 1
            and torch.device(model.device).type == "cpu"):
        model._rank, model._world_size = state.process_index, state.num_processes


class PruningModel:
    """What every ``zoo_prune`` backend class adds to lmms-eval's: pruning, the resume cache and
    per-document failures. Listed before the backend in the bases, so its methods come first."""

    is_simple = False

    def __init__(self, pretrained: str = "llava-hf/llava-1.5-7b-hf", method: str = "zoo", keep: int | float = 64,
                 resume_cache: str | None = None, **kwargs):
        for module in str(kwargs.pop("import", "") or "").split("+"):
            if module:
                importlib.import_module(module)  # registers the user's methods
        backend_init = next(c for c in type(self).__mro__ if issubclass(c, lmms) and not issubclass(c, PruningModel)).__init__
        accepted = [name for name, p in inspect.signature(backend_init).parameters.items()
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "self"]
        backend = {k: v for k, v in kwargs.items() if k in accepted}
        options = {k: v for k, v in kwargs.items() if k not in accepted}
        one_process = int(os.environ.get("WORLD_SIZE", 1)) == 1  # several: the backend puts rank r on cuda:r
        on_cpu = str(backend.get("device", "")).startswith("cpu")  # CPU processes share the one device
        if "device_map" in accepted and backend.get("device_map") in (None, "") and (one_process or on_cpu):
            backend["device_map"] = backend.get("device") or "cuda"  # llava_hf's default "" fails under transformers 5
        if method not in UNPRUNED:
            get_method(method, **options)  # a bad method or option is named before the model loads
        elif options:
            raise ValueError(f"unknown zoo_prune model argument(s) {options} (method={method!r} prunes nothing)")
        super().__init__(pretrained=pretrained, **backend)
        share_cpu_processes(self)
        self.method, self.keep, self.options = method, keep, options
        self.pruning = None
        if method not in UNPRUNED and not (isinstance(keep, float) and keep == 1.0):
            self.pruning = apply_pruning(self.model, method, keep, **options)
        key = {"pretrained": pretrained, "weights": weights_stamp(pretrained), "method": method, "keep": keep,
               **{k: v for k, v in {**backend, **options}.items() if k not in NOT_IN_CACHE_KEY}}
        self.cache_key = json.dumps(key, sort_keys=True, default=str)
        self.resume_dir = resume_cache and Path(resume_cache) / hashlib.sha256(self.cache_key.encode()).hexdigest()[:16]
        self._resume = None
        self.failures: list[dict] = []

    def answer_store(self) -> "ResumeCache | None":
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

    def answer(self, requests: list) -> list:
        """Answers of a batch of requests (the backend's generation); subclasses batch as they can."""
        return super().generate_until(requests)

    def _answer_or_fail(self, requests: list) -> list:
        """Answers of ``requests``; a batch that fails is retried one document at a time, and a document
        that fails alone is logged and answered with an empty :class:`_Failed`."""
        try:
            return self.answer(requests)
        except Exception as error:  # noqa: BLE001 (any failure of one document must not stop the run)
            if len(requests) > 1:
                return [answer for request in requests for answer in self._answer_or_fail([request])]
            request = requests[0]
            self.failures.append({"task": request.task_name, "doc_id": request.doc_id, "error": repr(error)})
            logger.error(f"zoo_prune: document {request.doc_id} of {request.task_name} failed and is scored as an empty "
                         f"answer: {error!r}\n{traceback.format_exc(limit=3)}")
            return [_Failed("")]

    def generate_until(self, requests: list) -> list:
        """Answers of ``requests`` in batches of ``batch_size``; with ``resume_cache``, each batch's
        answers are stored as soon as it is done."""
        cache = self.answer_store()
        size = max(1, int(getattr(self, "batch_size_per_gpu", 1) or 1))
        groups: dict[str, list[int]] = {}  # requests that may share a batch (same task, split, settings)
        for i, request in enumerate(requests):
            groups.setdefault(_batch_key(request), []).append(i)
        chunks = [rows[start:start + size] for rows in groups.values() for start in range(0, len(rows), size)]
        answers = [None] * len(requests)
        backend = _Answerer(self._answer_or_fail)
        logger.disable(PER_CALL_LOG)  # the backend's throughput line per call (the final table still counts them)
        try:
            for chunk in tqdm(chunks, desc="zoo_prune answering", disable=self.rank != 0):
                batch = [requests[i] for i in chunk]
                with contextlib.redirect_stderr(io.StringIO()):  # the backend's own progress bar per call
                    results = cache.execute(backend, "generate_until", batch) if cache else self._answer_or_fail(batch)
                for i, result in zip(chunk, results):
                    answers[i] = result
        finally:
            logger.enable(PER_CALL_LOG)
        if cache is not None:
            cache.report(self.rank)
        if self.failures:
            print(f"zoo_prune: {len(self.failures)} document(s) failed and were scored as empty answers "
                  f"(first: {self.failures[0]})", flush=True)
        return [str(a) if isinstance(a, _Failed) else a for a in answers]


def _batch_key(request) -> str:
    """Requests that may share a batch: same task, split and generation settings."""
    args = request.args
    return json.dumps([request.task_name, str(args[-1]), args[2]], sort_keys=True, default=str)


class _Answerer:
    """What ``ResponseCache.execute`` calls for the answers it has not stored."""

    def __init__(self, generate):
        self.generate_until = generate


class ZooPruneLlava(PruningModel, LlavaHf):
    """lmms-eval's chat ``llava_hf`` with pruning, generating ``batch_size`` documents per call."""

    def __init__(self, pretrained: str = "llava-hf/llava-1.5-7b-hf", **kwargs):
        batch_size = int(kwargs.pop("batch_size", 1) or 1)
        super().__init__(pretrained=pretrained, **kwargs)
        self.batch_size_per_gpu = batch_size  # the backend asserts 1 in its own loop, which answer() replaces

    def answer(self, requests: list) -> list:
        """One left-padded ``generate`` over the documents of ``requests`` (same task and settings),
        each prompt built exactly as lmms-eval's chat ``llava_hf`` builds it."""
        texts, images = [], []
        for request in requests:
            _, doc_to_messages, _, doc_id, task, split = request.args
            messages = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
            visuals, videos, _ = messages.extract_media()
            if videos:
                raise ValueError("zoo_prune's LLaVA backend does not take videos")
            texts.append(self._image_processor.apply_chat_template(messages.model_dump()["messages"], tokenize=False,
                                                                   add_generation_prompt=True))
            images.append(visuals)
        if any(len(v) != len(images[0]) for v in images) and len(requests) > 1:
            raise ValueError("documents with different numbers of images in one batch")  # retried one by one
        flat = [image for visuals in images for image in visuals] or None
        inputs = self._image_processor(images=flat, text=texts, return_tensors="pt", padding=True)
        inputs = inputs.to(self._device, self.model.dtype)
        settings = dict(requests[0].args[2])
        settings.setdefault("max_new_tokens", 1024)
        temperature = settings.get("temperature", 0)
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                top_p=settings.get("top_p"), num_beams=settings.get("num_beams", 1),
                max_new_tokens=settings["max_new_tokens"], use_cache=self.use_cache,
                pad_token_id=self.eot_token_id, eos_token_id=self.eot_token_id)
        new = output[:, inputs["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        counts = (new != self.eot_token_id).sum(dim=1).tolist()
        return [GenerationResult(text=text, token_counts=TokenCounts(output_tokens=n)) for text, n in zip(texts, counts)]


class ZooPrune(lmms):
    """lmms-eval model ``zoo_prune``: ``create_from_arg_string`` returns the backend class's instance for
    the checkpoint's ``model_type`` (:func:`backend_class`); use the classes themselves from Python."""

    is_simple = False

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        target = backend_class(model_type(str(args.get("pretrained", "llava-hf/llava-1.5-7b-hf"))))
        return target.create_from_arg_string(arg_string, additional_config)

    def __init__(self, *args, **kwargs):
        raise TypeError("ZooPrune is the lmms-eval entry point; in Python use "
                        "zoo_prune.integrations.lmms_eval.backend_class(model_type(pretrained))(pretrained=..., ...)")

    def loglikelihood(self, requests):  # pragma: no cover (never instantiated)
        raise NotImplementedError

    def generate_until(self, requests):  # pragma: no cover
        raise NotImplementedError

    def generate_until_multi_round(self, requests):  # pragma: no cover
        raise NotImplementedError


class ResumeCache(ResponseCache):
    """lmms-eval's response cache, used per batch. An empty answer is stored too (it is what the
    model said), a failed document's is not."""

    @staticmethod
    def _is_valid_response(response, request_type: str) -> bool:
        return response is not None and not isinstance(response, _Failed)

    @staticmethod
    def _extract_cacheable(response):
        if isinstance(response, GenerationResult):
            return response.text
        return response

    def report(self, rank: int) -> None:
        """One line with this run's reused and computed answers (the kill / resume check reads it)."""
        stats = self.get_stats()
        print(f"zoo_prune resume cache (rank {rank}): {stats['hits']} answers reused, {stats['misses']} computed, "
              f"{stats['total_cached_entries']} stored in {self.db_path}", flush=True)
