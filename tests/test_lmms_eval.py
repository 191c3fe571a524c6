"""lmms-eval integration: the testbed task YAMLs, the registered ``zoo_prune`` model, the runner
(failure detection, dry run) and resuming an interrupted evaluation.

A tiny random-weight LLaVA whose tokenizer covers the testbed's words stands in for the trained
testbed model: its scores are noise, the plumbing is what is tested. lmms-eval is imported
unconditionally: the project installs it, so a missing lmms-eval fails these tests.
"""

import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from lmms_eval.api.model import lmms
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.models import get_model
from lmms_eval.models.chat.llava_hf import LlavaHf
from lmms_eval.tasks import TaskManager, get_task_dict

from zoo_prune import available_methods, get_method, keep_count, method_class, tiny
from zoo_prune.evaluation import PAPER_TASKS, TESTBED_TASKS, LmmsEvalError, run_lmms_eval
from zoo_prune.integrations.lmms_eval import ZooPrune, ZooPruneLlava, backend_class, model_type
from zoo_prune.testbed.dataset import build_splits
from zoo_prune.testbed.questions import ANSWERS, FAMILIES

TASKS = [f"testbed_{family}" for family in FAMILIES]
KEEP, TOKENS = 16, (tiny.IMAGE_SIZE // tiny.PATCH_SIZE) ** 2


def save_tiny_testbed_model(path: Path, data: Path) -> Path:
    """``tiny.build_tiny("llava")`` with a tokenizer that also holds every word of ``data``'s questions and answers."""
    from datasets import load_from_disk

    words = [answer for answers in ANSWERS.values() for answer in answers]
    for family in FAMILIES:
        for split in load_from_disk(str(data / "tasks" / family)).values():
            words += [word for question in split["question"] for word in re.findall(r"\w+", question)]
    model, processor = tiny.build_tiny("llava")
    processor.tokenizer = tiny.tiny_tokenizer([*tiny.WORDS, *words])
    model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory holding data/testbed (4 test questions per task) and tiny-llava/."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lmms")
    build_splits(root / "data" / "testbed", sizes={"train": 0, "validation": 2, "test": 4}, progress=False)
    save_tiny_testbed_model(root / "tiny-llava", root / "data" / "testbed")
    return root


@pytest.fixture
def in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)  # the task YAMLs read data/testbed relative to the working directory
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return workdir


def make_model(workdir, pretrained=None, **model_args) -> ZooPruneLlava:
    args = {k: v for k, v in {"method": "zoo", "keep": KEEP, "m": 8, "seed": 0, **model_args}.items() if v is not None}
    return ZooPruneLlava(pretrained=str(pretrained or workdir / "tiny-llava"), device="cpu", **args)


def record_image_tokens(model) -> list[int]:
    """Filled per model call: the image placeholder tokens reaching the inner VLM (which scatters the features)."""
    counts = []

    def hook(module, args, kwargs):
        counts.append(int((kwargs["input_ids"] == model.config.image_token_id).sum()))

    model.model.model.register_forward_pre_hook(hook, with_kwargs=True)
    return counts


def evaluate(model, limit=2) -> dict:
    manager = TaskManager("WARNING", include_path=str(TESTBED_TASKS), include_defaults=False, model_name="zoo_prune")
    return simple_evaluate(model=model, tasks=["testbed"], limit=limit, task_manager=manager, bootstrap_iters=0)


def test_task_yamls_load_and_score(in_workdir):
    manager = TaskManager("WARNING", include_path=str(TESTBED_TASKS), include_defaults=False)
    assert {"testbed", *TASKS} <= set(manager.all_tasks)
    [(group, tasks)] = get_task_dict(["testbed"], manager, "chat").items()
    assert sorted(tasks) == sorted(TASKS)
    for name, task in tasks.items():
        docs = list(task.test_docs())
        assert len(docs) == 4
        [turn] = task.doc_to_messages(docs[0])
        image, text = turn["content"]
        assert image["type"] == "image" and image["url"].size == (96, 96)
        assert text == {"type": "text", "text": docs[0]["question"]}  # verbatim: no pre / post prompt
        assert task.config.generation_kwargs["do_sample"] is False
    existence = tasks["testbed_existence"]
    docs = [{"family": "existence", "answer": a} for a in ("yes", "yes", "no", "no")]
    items = [existence.process_results(d, [r])["f1"] for d, r in zip(docs, [" Yes.", "no", "yes", "No"])]
    assert existence.aggregation()["f1"](items) == pytest.approx(0.5)  # tp 1, predicted 2, actual 2
    attribute = tasks["testbed_attribute"]
    red = {"family": "attribute", "answer": "red"}
    items = [attribute.process_results(red, [r])["accuracy"] for r in ("RED ", "blue")]
    assert attribute.aggregation()["accuracy"](items) == 0.5


def test_registered_model_answers_with_k_visual_tokens(in_workdir):
    assert get_model("zoo_prune") is ZooPrune and get_model("zoo_prune_llava") is ZooPruneLlava
    model = ZooPrune.create_from_arg_string(f"pretrained={in_workdir / 'tiny-llava'},method=zoo,keep={KEEP},m=8", {"device": "cpu"})
    assert type(model) is ZooPruneLlava  # a static class, picked by the checkpoint's model_type
    assert isinstance(model, LlavaHf) and isinstance(model, lmms) and not model.is_simple
    image_tokens = record_image_tokens(model)
    results = evaluate(model, limit=1)
    assert set(TASKS) <= set(results["results"])
    assert [n for n in image_tokens if n] == [KEEP] * len(TASKS)
    assert [k.numel() for k in model.pruning.kept_indices] == [KEEP]


def test_llm_stage_method_sparsevlm_answers_through_the_registered_model(in_workdir):
    model = make_model(in_workdir, method="sparsevlm", m=None, seed=None)
    results = evaluate(model, limit=1)
    assert set(TASKS) <= set(results["results"])
    counts = model.pruning.attachment.hooks.tokens_per_layer
    assert counts == [get_method("sparsevlm").visual_tokens(TOKENS, KEEP, 3)]  # the last call's one image
    assert counts[0][0] == TOKENS > counts[0][-1]


def test_unpruned_and_bad_model_args(workdir):
    assert make_model(workdir, method="none", m=None, seed=None).pruning is None
    assert make_model(workdir, keep=1.0).pruning is None
    with pytest.raises(ValueError, match="nope"):
        make_model(workdir, method="nope")
    with pytest.raises(ValueError, match="typo"):
        make_model(workdir, method="none", m=None, seed=None, typo=1)
    with pytest.raises(FileNotFoundError, match="no/such/model"):
        ZooPrune.create_from_arg_string("pretrained=./no/such/model", {"device": "cpu"})
    with pytest.raises(TypeError, match="entry point"):
        ZooPrune(pretrained=str(workdir / "tiny-llava"))


def test_qwen_backend_needs_qwen_vl_utils():
    from lmms_eval.models.chat import qwen2_5_vl

    if qwen2_5_vl._has_qwen_vl:
        assert issubclass(backend_class("qwen2_5_vl"), qwen2_5_vl.Qwen2_5_VL)
    else:
        with pytest.raises(ImportError, match="qwen-vl-utils"):
            backend_class("qwen2_5_vl")
    assert issubclass(backend_class("llava_next"), LlavaHf)
    with pytest.raises(ValueError, match="'bert'"):
        backend_class("bert")


def test_interrupted_run_resumes_without_recomputing(in_workdir):
    """10 questions (2 per task); the run is interrupted during the 4th, the next one computes only 7
    and answers as an uninterrupted run does."""
    cache = in_workdir / "resume-cache"
    calls = []

    def count_calls(model, stop_at=None):
        generate = model.model.generate

        def counted(*args, **kwargs):
            calls.append(1)
            if len(calls) == stop_at:
                raise KeyboardInterrupt
            return generate(*args, **kwargs)

        model.model.generate = counted

    first = make_model(in_workdir, seed=3, resume_cache=str(cache))
    count_calls(first, stop_at=4)
    with pytest.raises(KeyboardInterrupt):
        evaluate(first)
    calls.clear()
    second = make_model(in_workdir, seed=3, resume_cache=str(cache))
    count_calls(second)
    results = evaluate(second)
    assert set(TASKS) <= set(results["results"])
    stats = second.answer_store().get_stats()
    assert (stats["hits"], stats["misses"], stats["total_cached_entries"], len(calls)) == (3, 7, 10, 7)
    uninterrupted = evaluate(make_model(in_workdir, seed=3))
    for task in TASKS:  # the same answers as one uninterrupted run
        assert [s["resps"] for s in results["samples"][task]] == [s["resps"] for s in uninterrupted["samples"][task]]
    other = make_model(in_workdir, seed=4, resume_cache=str(cache))  # another seed: another key
    assert other.resume_dir != second.resume_dir


def test_cli_run_writes_results_and_reuses_answers(workdir, monkeypatch, capfd):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = {"pretrained": str(workdir / "tiny-llava"), "method": "zoo", "keep": KEEP, "m": 8, "seed": 5}
    results = run_lmms_eval(args, ["testbed"], "out", limit=2, device="cpu", cwd=workdir, use_cache="cli-cache")
    assert set(TASKS) <= set(results["results"]) and Path(results["results_path"]).is_file()
    assert "0 answers reused, 10 computed" in capfd.readouterr().out


def test_failed_run_is_detected(workdir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = {"pretrained": str(workdir / "tiny-llava"), "method": "zoo", "keep": KEEP}
    with pytest.raises(LmmsEvalError, match=r"(?s)exit code 0\).*no results JSON.*command: .*--tasks testbed_nope"):
        run_lmms_eval(args, ["testbed_nope"], "bad", limit=1, device="cpu", cwd=workdir, use_cache=False)


def test_exit_zero_without_results_is_a_failure(tmp_path, monkeypatch):
    exit_zero = [sys.executable, "-c", "print('done')"]
    monkeypatch.setattr("zoo_prune.evaluation.lmms_eval_command", lambda *args, **kwargs: exit_zero)
    with pytest.raises(LmmsEvalError, match="no results JSON"):
        run_lmms_eval({"pretrained": "x"}, ["testbed"], tmp_path)


def test_dry_run_prints_the_exact_command(capsys):
    args = {"pretrained": "llava-hf/llava-1.5-7b-hf", "method": "zoo", "keep": 64, "m": 64, "h": 0.01}
    run = run_lmms_eval(args, list(PAPER_TASKS), "outputs/paper", include_path=None, dry_run=True, device="cuda")
    command = run["command"]
    assert capsys.readouterr().out.strip() == shlex.join(command)
    assert command[:3] == [sys.executable, "-m", "lmms_eval"]
    assert shlex.join(command[3:]) == (
        "--model zoo_prune --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=zoo,keep=64,m=64,h=0.01,"
        "resume_cache=outputs/lmms_cache --tasks " + ",".join(PAPER_TASKS) +
        " --batch_size 1 --output_path outputs/paper --log_samples --device cuda")
    several = run_lmms_eval(args, ["pope"], "out", dry_run=True, num_processes=8, include_path=None)["command"]
    assert several[1:6] == ["launch", "--num_processes=8", "--main_process_port=0", "-m", "lmms_eval"]
    with pytest.raises(ValueError, match="keep"):
        run_lmms_eval({**args, "keep": "6,4"}, ["pope"], "out", dry_run=True)
    local = run_lmms_eval(args, ["testbed"], "out", dry_run=True, batch_size=16)["command"]  # the testbed's own tasks
    assert local[1:3] == ["-m", "zoo_prune.integrations.lmms_eval_cli"] and local[local.index("--batch_size") + 1] == "16"


@pytest.mark.parametrize("stubbed", [True, False], ids=["stubbed", "qwen-vl-utils"])
def test_qwen_backend_prunes(in_workdir, monkeypatch, stubbed):
    """lmms-eval's qwen2_5_vl under zoo_prune on a tiny Qwen2.5-VL. As it is where qwen-vl-utils and torchvision
    are installed (.venv-rehearse, ``make install-rehearse``); in .venv (no torchvision build for its CPU torch)
    with the two pieces they provide stubbed: qwen-vl-utils' ``process_vision_info`` (here: the messages' images
    as they are) and loading the processor (transformers' Qwen video processor needs torchvision)."""
    from types import SimpleNamespace

    from lmms_eval.models.chat import qwen2_5_vl as chat
    from lmms_eval.models.simple import qwen2_5_vl as simple

    if not stubbed and not chat._has_qwen_vl:
        pytest.skip("qwen-vl-utils (which needs torchvision) is not installed: .venv-rehearse has it")
    model, processor = tiny.build_tiny("qwen2_5_vl")
    folder = in_workdir / ("tiny-qwen-stubbed" if stubbed else "tiny-qwen")
    model.save_pretrained(folder)
    if stubbed:
        def process_vision_info(conversations, **kwargs):
            items = [item for turns in conversations for turn in turns for item in turn["content"]]
            return [item["image"] for item in items if item["type"] == "image"], None, {}

        monkeypatch.setattr(chat, "_has_qwen_vl", True)
        monkeypatch.setattr(chat, "process_vision_info", process_vision_info)
        monkeypatch.setattr(simple, "AutoProcessor", SimpleNamespace(from_pretrained=lambda *a, **k: processor))
        monkeypatch.setattr(simple, "AutoTokenizer", SimpleNamespace(from_pretrained=lambda *a, **k: processor.tokenizer))
    else:  # what a checkpoint folder holds; the backend loads its processor (with the video half) itself
        processor.image_processor.save_pretrained(folder)
        processor.tokenizer.save_pretrained(folder)
        (folder / "chat_template.jinja").write_text(processor.chat_template)
    size = processor.image_processor.size  # the tiny model's pixel range (lmms-eval's default: 448 px and more)
    min_pixels, max_pixels = size["shortest_edge"], size["longest_edge"]
    qwen = backend_class(model_type(str(folder)))(pretrained=str(folder), device="cpu", method="zoo", keep=0.5, m=8,
                                                  min_pixels=min_pixels, max_pixels=max_pixels)
    assert isinstance(qwen, chat.Qwen2_5_VL)
    image_tokens = record_image_tokens(qwen)
    grids = []
    generate = qwen.model.generate
    qwen.model.generate = lambda *a, **k: grids.append(k["image_grid_thw"]) or generate(*a, **k)
    results = evaluate(qwen, limit=1)
    assert set(TASKS) <= set(results["results"])
    [kept] = qwen.pruning.kept_indices
    tokens = [int(grid.prod()) // 4 for [grid] in grids]  # each call's one image, merged 2 x 2
    assert [n for n in image_tokens if n] == [keep_count(0.5, n) for n in tokens] and len(tokens) == len(TASKS)
    assert kept.numel() == keep_count(0.5, tokens[-1])


COMMITTED_MODEL = Path(__file__).resolve().parents[1] / "models" / "testbed-llava"


@pytest.mark.parametrize("method", ["none", *available_methods()])
def test_batched_answers_equal_batch_of_one(in_workdir, method):
    """The committed testbed model answers 4 questions per task in batches of 3 (left-padded, one
    generate call each) exactly as one at a time, for every registered method."""
    if method == "none":
        options = {"method": "none", "m": None, "seed": None}
    else:
        options = {"method": method, "m": None, "seed": None, **{k: v for k, v in {"m": 8, "seed": 0}.items()
                                                                   if k in method_class(method).options()}}
    one = make_model(in_workdir, pretrained=COMMITTED_MODEL, **options)
    batched = make_model(in_workdir, pretrained=COMMITTED_MODEL, batch_size=3, **options)
    calls = []
    generate = batched.model.generate
    batched.model.generate = lambda *a, **k: calls.append(k["input_ids"].shape[0]) or generate(*a, **k)
    single, several = evaluate(one, limit=4), evaluate(batched, limit=4)
    assert 3 in calls  # really batched
    for task in TASKS:
        assert [s["resps"] for s in several["samples"][task]] == [s["resps"] for s in single["samples"][task]]


def test_a_failing_document_is_scored_empty_and_the_run_goes_on(in_workdir):
    model = make_model(in_workdir, batch_size=2)
    generate = model.model.generate
    failing = {"rows": 0}

    def fail_on_one(*args, **kwargs):  # the 3rd single-row call fails: one document of a retried batch
        if kwargs["input_ids"].shape[0] == 1:
            failing["rows"] += 1
            if failing["rows"] == 1:
                raise RuntimeError("corrupt image")
        elif failing["rows"] == 0:
            raise RuntimeError("a batch holding the corrupt image")
        return generate(*args, **kwargs)

    model.model.generate = fail_on_one
    results = evaluate(model, limit=2)
    assert set(TASKS) <= set(results["results"])
    [failure] = model.failures
    assert "corrupt image" in failure["error"]
    answers = [s["resps"] for task in TASKS for s in results["samples"][task]]
    assert sum(a == [[""]] or a == [""] for a in answers) >= 1 and len(answers) == 10


def test_a_method_registered_in_user_code_runs_through_the_lmms_eval_model(in_workdir, monkeypatch):
    """``import=<module>`` loads the user's module (here a file on the path) before the method is looked up."""
    (in_workdir / "user_methods_for_lmms.py").write_text(
        "import torch\n"
        "from dataclasses import dataclass\n"
        "from zoo_prune import register_method\n"
        "from zoo_prune.methods import ProjectorMethod\n\n"
        "@register_method('last_k_user')\n"
        "@dataclass\n"
        "class LastK(ProjectorMethod):\n"
        "    def select(self, features, projected, k, *, projector):\n"
        "        n = projected.shape[-2]\n"
        "        return torch.arange(n - k, n).expand(*projected.shape[:-2], k)\n")
    monkeypatch.syspath_prepend(str(in_workdir))
    model = make_model(in_workdir, method="last_k_user", m=None, seed=None, **{"import": "user_methods_for_lmms"})
    image_tokens = record_image_tokens(model)
    results = evaluate(model, limit=1)
    assert set(TASKS) <= set(results["results"]) and [n for n in image_tokens if n] == [KEEP] * len(TASKS)
    assert model.pruning.kept_indices[0].tolist() == list(range(TOKENS - KEEP, TOKENS))
