"""Stand-in datasets and task YAMLs for the paper's nine lmms-eval tasks (zoo_prune.rehearsal.tasks).

Each stand-in runs lmms-eval 0.7.3's own task code: here its prompts and scorers see the stand-in
documents, the correct answers (read from each document as the real benchmark stores them) get the
full score of the real metric and wrong ones none; and lmms-eval itself runs two stand-ins end to end
with a tiny random-weight LLaVA through ``run_lmms_eval``.
"""

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lmms_eval.tasks import TaskManager, get_task_dict

from analysis import stats
from zoo_prune import tiny
from zoo_prune.evaluation import PAPER_TASKS, run_lmms_eval
from zoo_prune.rehearsal.tasks import MME_CATEGORIES, build_standins, standin_name

DOCS = 4
SIZES = ((96, 96), (128, 96))  # small, for speed (the generator's default sizes are photo-like)


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearsal") / "standins"
    manifest = build_standins(out, PAPER_TASKS, docs=DOCS, image_sizes=SIZES)
    return out, manifest


@pytest.fixture(scope="module")
def tasks(standins):
    out, _ = standins
    manager = TaskManager("WARNING", include_path=str(out / "tasks"), include_defaults=False, model_name="zoo_prune")
    return get_task_dict([standin_name(t) for t in PAPER_TASKS], manager)


def correct_answer(task: str, doc: dict) -> str:
    """What a perfect model answers, read from the document as the real benchmark stores its key."""
    if task == "scienceqa_img":
        return "ABCDE"[doc["answer"]]
    if task == "vqav2_val":
        return doc["multiple_choice_answer"]
    if task == "textvqa_val":
        return max(set(doc["answers"]), key=doc["answers"].count)
    return doc["answer"]  # gqa, pope, mme (Yes / No), mmbench, mmmu and seedbench (a letter, or MMMU's open answer)


def score(task, docs, answers, tmp_path) -> dict:
    """lmms-eval's own per-document results and aggregation, as its evaluator calls them."""
    results = [task.process_results(doc, [answer]) for doc, answer in zip(docs, answers)]
    scores = {}
    for metric, aggregate in task.aggregation().items():
        items = [r[metric] for r in results if metric in r]
        if items:
            takes_args = "args" in inspect.signature(aggregate).parameters
            scores[metric] = aggregate(items, args=SimpleNamespace(output_path=str(tmp_path))) if takes_args else aggregate(items)
    return scores


PERFECT = {  # the real metric of each task (the paper's column) and its full score
    "gqa": ("exact_match", 1.0),
    "mmbench_en_dev_static": ("gpt_eval_score", 100.0),
    "pope": ("pope_f1_score", 1.0),
    "scienceqa_img": ("exact_match", 1.0),
    "vqav2_val": ("exact_match", 1.0),
    "textvqa_val": ("exact_match", 1.0),
    "mmmu_val": ("mmmu_acc", 1.0),
    "seedbench": ("seed_image", 1.0),
}


def test_manifest_and_yamls_include_lmms_evals_own_tasks(standins):
    out, manifest = standins
    assert list(manifest["tasks"]) == list(PAPER_TASKS)
    for task, entry in manifest["tasks"].items():
        text = (out / entry["yaml"]).read_text()
        include = Path(entry["includes"])
        assert include.is_file() and include.parts[-3:-1] == ("tasks", include.parent.name) and "lmms_eval" in include.parts
        assert f'include: "{include}"' in text and f"task: {standin_name(task)}" in text and "load_from_disk: true" in text
        overrides = {line.split(":")[0] for line in text.splitlines() if line and not line.startswith((" ", "#"))}
        assert overrides == {"include", "task", "tag", "dataset_path", "dataset_kwargs"} | ({"process_docs"} if task == "gqa" else set())
        assert entry["docs"] == (2 * DOCS if task == "mme" else DOCS)


def test_lmms_evals_prompts_and_scorers_run_on_every_standin(tasks, tmp_path):
    assert sorted(tasks) == sorted(standin_name(t) for t in PAPER_TASKS)
    for real in PAPER_TASKS:
        task = tasks[standin_name(real)]
        docs = list(task.test_docs())
        assert len(docs) == (2 * DOCS if real == "mme" else DOCS)
        for doc in docs:
            text = task.doc_to_text(doc)
            visuals = task.doc_to_visual(doc)
            assert isinstance(text, str) and len(visuals) == 1 and visuals[0].size in SIZES, real
        right = score(task, docs, [correct_answer(real, d) for d in docs], tmp_path)
        wrong = score(task, docs, ["zzz"] * len(docs), tmp_path)
        if real == "mme":  # per category: accuracy + accuracy+ (both questions of an image right), in percent
            categories = {d["category"] for d in docs}
            cognition = categories & {"numerical_calculation"}
            assert right == {"mme_perception_score": 200.0 * len(categories - cognition),
                             "mme_cognition_score": 200.0 * len(cognition)}
            assert wrong == {"mme_perception_score": 0.0, "mme_cognition_score": 0.0}
            continue
        metric, full = PERFECT[real]
        assert right[metric] == pytest.approx(full), (real, right)
        assert wrong[metric] == 0, (real, wrong)


def test_lmms_eval_runs_two_standins_end_to_end(standins, tmp_path, monkeypatch):
    """The real CLI (subprocess) on the stand-ins: results JSON with each task's own metrics."""
    out, _ = standins
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.manual_seed(0)
    model, processor = tiny.build_tiny("llava")
    model.save_pretrained(tmp_path / "tiny-llava")
    processor.save_pretrained(tmp_path / "tiny-llava")
    args = {"pretrained": str(tmp_path / "tiny-llava"), "method": "none", "device_map": "cpu"}
    names = [standin_name("pope"), standin_name("mme")]
    results = run_lmms_eval(args, names, "eval", limit=4, include_path=out / "tasks", use_cache=False, device="cpu",
                            cwd=tmp_path)
    assert Path(results["results_path"]).is_file()
    pope, mme = (results["results"][name] for name in names)
    assert 0 <= pope["pope_f1_score,none"] <= 1 and 0 <= pope["pope_accuracy,none"] <= 1
    assert {"mme_perception_score,none", "mme_cognition_score,none"} <= set(mme)  # first two images: both kinds
    scores = stats.task_scores(results)  # the paper's primary metrics, as the pipeline reads them
    assert scores == {names[0]: pope["pope_f1_score,none"],
                      names[1]: mme["mme_perception_score,none"] + mme["mme_cognition_score,none"]}
    assert set(MME_CATEGORIES[:2]) == {"existence", "numerical_calculation"}
    samples = list((tmp_path / "eval").glob(f"**/*_samples_{names[0]}.jsonl"))
    assert len(samples) == 1 and len(samples[0].read_text().splitlines()) == 4
    assert all(json.loads(line)["filtered_resps"] for line in samples[0].read_text().splitlines())  # the model answered


def test_bad_input_is_refused_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="'vqav2'"):
        build_standins(tmp_path / "a", ["pope", "vqav2"])
    assert not (tmp_path / "a").exists() and not list(tmp_path.iterdir())
    build_standins(tmp_path / "b", ["pope"], docs=2)
    with pytest.raises(ValueError, match="exists"):
        build_standins(tmp_path / "b", ["pope"], docs=2)
    with pytest.raises(ValueError, match="docs must be >= 2"):
        build_standins(tmp_path / "c", ["pope"], docs=1)
