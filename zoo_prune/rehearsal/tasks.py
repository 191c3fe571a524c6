"""Stand-in datasets and task YAMLs for the paper's nine lmms-eval tasks, for rehearsing on CPU.

    python -m zoo_prune.rehearsal.tasks --out data/standins [--docs 6] [--tasks gqa,pope]

For each task of params.yaml ``paper.tasks`` this writes a small local dataset with the columns that
lmms-eval 0.7.3's real task reads (images drawn by the testbed generator ``zoo_prune.testbed``, questions
about what is drawn), saved with ``datasets.save_to_disk`` under the real task's split name, and a
task YAML ``<task>_standin`` that ``include:``s lmms-eval's own YAML of that task (its installed path,
resolved now) and overrides only where the data comes from (``dataset_path``, ``dataset_kwargs:
{load_from_disk: true}``). lmms-eval's own ``doc_to_text``, ``doc_to_visual``, ``process_results``,
aggregation and generation settings therefore run unchanged, and the results JSON holds the real
metric names (``pope_f1_score``, ``mme_perception_score``, ``gpt_eval_score``, ...). One more override:
GQA's ``process_docs`` joins images from a second hub dataset, so its stand-in joins them from a
second local dataset the same way (``gqa_join_images``).

Layout of ``--out``::

    manifest.json           the generator's settings; per task: standin name, yaml, dataset, split, docs, includes
    data/<task>/            DatasetDict {<real split>: rows} (GQA: data/gqa/instructions and data/gqa/images)
    tasks/<task>_standin.yaml, tasks/utils.py

Run them with ``--include_path <out>/tasks --tasks gqa_standin,pope_standin`` (``run_lmms_eval(...,
include_path=<out>/tasks)``). The stand-ins keep the real names plus ``_standin`` because lmms-eval
indexes its own tasks first and a same-named local task would be shadowed. Random-weight models score
noise on them: they rehearse the plumbing, not the paper's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .._checks import check_int
from ..testbed.questions import ask
from ..testbed.scenes import BOX, COLOURS, GLYPHS, SHAPES, Scene, generate_scene

SUFFIX = "_standin"
SEED_BASE = 9_000_000  # scene seeds: disjoint from the testbed's splits (dataset seeds 0..2 use < 9e6)
SEEDS_PER_TASK = 10_000
OPTION_LETTERS = "ABCD"
# Image sizes (width, height), cycled over the documents: like benchmark photos, they make LLaVA-NeXT pick
# different anyres grids (672 x 672: 5 patches, 2880 tokens before unpadding) and Qwen2.5-VL different grids.
IMAGE_SIZES = ((672, 672), (640, 480), (336, 336), (480, 640))


def standin_name(task: str) -> str:
    return task + SUFFIX


TASK_FILES = {  # lmms-eval 0.7.3 task -> its YAML under lmms_eval/tasks/
    "gqa": "gqa/gqa.yaml",
    "mmbench_en_dev": "mmbench/mmbench_en_dev.yaml",
    "mmbench_en_dev_static": "mmbench/mmbench_en_dev_static.yaml",
    "mme": "mme/mme.yaml",
    "pope": "pope/pope.yaml",
    "scienceqa_img": "scienceqa/scienceqa_img.yaml",
    "vqav2_val": "vqav2/vqav2_val.yaml",
    "textvqa_val": "textvqa/textvqa_val.yaml",
    "mmmu_val": "mmmu/mmmu_val.yaml",
    "seedbench": "seedbench/seedbench.yaml",
}


def lmms_eval_task_yaml(task: str) -> Path:
    """The installed YAML file that defines lmms-eval task ``task`` (checked: it names that task)."""
    import importlib.util

    import yaml

    if task not in TASK_FILES:
        raise ValueError(f"no stand-in for task {task!r}; known: {sorted(TASK_FILES)}")
    spec = importlib.util.find_spec("lmms_eval")  # locates the package without importing it (7 s)
    if spec is None:
        raise ValueError("lmms-eval is not installed (pip install --no-deps lmms-eval==0.7.3)")
    path = Path(spec.submodule_search_locations[0]).resolve() / "tasks" / TASK_FILES[task]

    class Loader(yaml.SafeLoader):  # reads the task's name; its `!function` entries are not imported here
        pass

    Loader.add_constructor("!function", lambda loader, node: None)
    if not path.is_file() or yaml.load(path.read_text(), Loader=Loader).get("task") != task:
        raise ValueError(f"{path} does not define lmms-eval task {task!r} (another lmms-eval version?)")
    return path


# ----------------------------------------------------------------------------------------- scenes

def draw(seed: int, size: tuple[int, int]) -> tuple[Scene, Image.Image]:
    """A testbed scene drawn at the larger side of ``size`` = (width, height), the image resized to ``size``."""
    scene = generate_scene(seed, max(size))
    image = Image.fromarray(scene.image)
    return scene, image if image.size == tuple(size) else image.resize(tuple(size), Image.BICUBIC)


def _shapes(scene: Scene) -> list:
    return [o for o in scene.objects if o.shape != BOX]


def _boxes(scene: Scene) -> list:
    return [o for o in scene.objects if o.shape == BOX]


def _others(rng: np.random.Generator, answer: str, pool, n: int) -> list[str]:
    """``n`` options: ``answer`` and n - 1 others from ``pool``, shuffled by ``rng``."""
    others = [x for x in pool if x != answer]
    chosen = [answer, *rng.choice(others, size=n - 1, replace=False).tolist()]
    return [chosen[i] for i in rng.permutation(n)]


def _attribute(scene: Scene, rng: np.random.Generator) -> tuple[str, str, tuple]:
    """(question, answer, answer pool) of a GQA-like attribute question about the scene."""
    [qa] = ask(scene, ("attribute",), 1)
    pool = tuple(COLOURS) if qa["answer"] in COLOURS else SHAPES
    return qa["question"], qa["answer"], pool


def _existence_pair(scene: Scene) -> list[dict]:
    """Two existence questions about the scene, answers yes then no (POPE-like, adversarial no)."""
    qas = sorted(ask(scene, ("existence",), 2), key=lambda qa: qa["answer"] != "yes")
    if [qa["answer"] for qa in qas] != ["yes", "no"]:
        raise ValueError(f"scene {scene.seed} has no yes / no pair of existence questions")
    return qas


# ------------------------------------------------------------------------------ one builder a task
# Each takes [(scene, image)] and returns (split, rows, features, extra datasets) with the columns the real
# task's utils read, plus those of the real dataset that its results or logs carry.

def _features(**columns):
    from datasets import Features

    return Features(columns)


def _value(dtype="string"):
    from datasets import Value

    return Value(dtype)


def _img():
    from datasets import Image as ImageFeature

    return ImageFeature()


def build_gqa(scenes, rng):
    """lmms-eval ``gqa``: testdev_balanced_instructions (question, answer, imageId) + images (id, image)."""
    rows, images = [], []
    for i, (scene, image) in enumerate(scenes):
        question, answer, _ = _attribute(scene, rng)
        image_id = f"n{scene.seed}"
        rows.append({"id": f"{i:08d}", "imageId": image_id, "question": question[0].upper() + question[1:],
                     "answer": answer, "fullAnswer": f"The answer is {answer}.", "isBalanced": True})
        images.append({"id": image_id, "image": image})
    features = _features(id=_value(), imageId=_value(), question=_value(), answer=_value(), fullAnswer=_value(),
                         isBalanced=_value("bool"))
    return "testdev", rows, features, {"images": (images, _features(id=_value(), image=_img()))}


def build_mmbench(scenes, rng):
    """lmms-eval ``mmbench_en_dev(_static)``: index, question, hint, A-D, answer letter, categories, image."""
    rows = []
    for i, (scene, image) in enumerate(scenes):
        question, answer, pool = _attribute(scene, rng)
        options = _others(rng, answer, pool, len(OPTION_LETTERS))
        rows.append({"index": i, "question": question[0].upper() + question[1:],
                     "hint": None if i % 2 else "The picture shows coloured shapes on a cluttered background.",
                     **dict(zip(OPTION_LETTERS, options)), "answer": OPTION_LETTERS[options.index(answer)],
                     "category": "attribute_recognition", "L2-category": "Fine-grained Perception (instance-level)",
                     "source": "zoo_prune.testbed", "split": "dev", "image": image})
    features = _features(index=_value("int64"), question=_value(), hint=_value(),
                         **{c: _value() for c in OPTION_LETTERS}, answer=_value(), category=_value(),
                         **{"L2-category": _value()}, source=_value(), split=_value(), image=_img())
    return "dev", rows, features, {}


MME_CATEGORIES = ("existence", "numerical_calculation", "count", "color", "position", "OCR")  # perception and cognition in the first two images


def _mme_pair(scene: Scene, category: str, rng) -> tuple[str, str]:
    """(yes question, no question) of an MME category about the scene."""
    shapes = _shapes(scene)
    apart = [(a, b) for a in shapes for b in shapes if a.bbox[2] <= b.bbox[0]]  # a strictly left of b
    if category == "existence" or (category == "position" and not apart):
        yes, no = (qa["question"] for qa in _existence_pair(scene))
        return yes.capitalize(), no.capitalize()
    if category in ("count", "numerical_calculation"):
        shape = scene.group_shape
        n = sum(o.shape == shape for o in shapes)
        if category == "count":
            return f"Are there {n} {shape}s in the image?", f"Are there {n + 1} {shape}s in the image?"
        return (f"Is the number of {shape}s plus 2 equal to {n + 2}?", f"Is the number of {shape}s plus 2 equal to {n + 3}?")
    if category == "color":
        o = shapes[0]
        wrong = next(c for c in COLOURS if c != o.colour)
        return f"Is the {o.shape} {o.colour}?", f"Is the {o.shape} {wrong}?"
    if category == "position":
        a, b = apart[0]
        return f"Is the {a.colour} {a.shape} left of the {b.colour} {b.shape}?", f"Is the {b.colour} {b.shape} left of the {a.colour} {a.shape}?"
    if category == "OCR":
        box = _boxes(scene)[0]
        wrong = GLYPHS[(GLYPHS.index(box.glyph) + 1) % len(GLYPHS)]
        return f"Is the digit in the {box.colour} box {box.glyph}?", f"Is the digit in the {box.colour} box {wrong}?"
    raise ValueError(f"no MME stand-in for category {category!r}")


def build_mme(scenes, rng):
    """lmms-eval ``mme``: two questions per image (answers Yes and No, one question_id), a category each."""
    rows = []
    for i, (scene, image) in enumerate(scenes):
        category = MME_CATEGORIES[i % len(MME_CATEGORIES)]
        for question, answer in zip(_mme_pair(scene, category, rng), ("Yes", "No")):
            rows.append({"question_id": f"{category}/{scene.seed}.png", "image": image,
                         "question": f"{question} Please answer yes or no.", "answer": answer, "category": category})
    features = _features(question_id=_value(), image=_img(), question=_value(), answer=_value(), category=_value())
    return "test", rows, features, {}


def build_pope(scenes, rng):
    """lmms-eval ``pope``: yes / no object questions (every no adversarial), one category per image."""
    rows = []
    for i, (scene, image) in enumerate(scenes):
        qa = _existence_pair(scene)[i % 2]
        rows.append({"id": str(i), "question_id": str(i), "question": f"Is there a {qa['question'][len('is there a '):-1]} in the image?",
                     "answer": qa["answer"], "image_source": f"standin_{scene.seed}", "image": image,
                     "category": ("adversarial", "popular", "random")[i % 3]})
    features = _features(id=_value(), question_id=_value(), question=_value(), answer=_value(), image_source=_value(),
                         image=_img(), category=_value())
    return "test", rows, features, {}


def build_scienceqa(scenes, rng):
    """lmms-eval ``scienceqa_img``: question, choices (2-4), answer (index), hint (context or empty), image."""
    rows = []
    for i, (scene, image) in enumerate(scenes):
        question, answer, pool = _attribute(scene, rng)
        choices = _others(rng, answer, pool, 2 + i % 3)
        rows.append({"image": image, "question": question[0].upper() + question[1:], "choices": choices,
                     "answer": choices.index(answer), "hint": "" if i % 2 else "Look at the shapes in the picture.",
                     "task": "closed choice", "grade": "grade1", "subject": "natural science", "topic": "shapes",
                     "category": "Identify shapes and colours", "skill": "Identify shapes", "lecture": "", "solution": ""})
    from datasets import Sequence

    features = _features(image=_img(), question=_value(), choices=Sequence(_value()), answer=_value("int8"), hint=_value(),
                         task=_value(), grade=_value(), subject=_value(), topic=_value(), category=_value(), skill=_value(),
                         lecture=_value(), solution=_value())
    return "test", rows, features, {}


def _ten_answers(answer: str, rng) -> list[str]:
    """Ten annotators: mostly ``answer``, sometimes one disagreeing (VQA accuracy is then < 1 for it)."""
    answers = [answer] * 10
    if rng.random() < 0.5:
        answers[int(rng.integers(10))] = "none"
    return answers


def build_vqav2(scenes, rng):
    """lmms-eval ``vqav2_val``: question, ten annotator answers ({answer, answer_confidence, answer_id}), image."""
    rows = []
    for i, (scene, image) in enumerate(scenes):
        family = ("attribute", "counting", "existence")[i % 3]
        [qa] = ask(scene, (family,), 1)
        answers = _ten_answers(qa["answer"], rng)
        rows.append({"question_type": family, "multiple_choice_answer": qa["answer"],
                     "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)],
                     "image_id": scene.seed, "answer_type": {"counting": "number", "existence": "yes/no"}.get(family, "other"),
                     "question_id": scene.seed * 10 + i, "question": qa["question"][0].upper() + qa["question"][1:],
                     "image": image})
    answer = {"answer": _value(), "answer_confidence": _value(), "answer_id": _value("int64")}
    features = _features(question_type=_value(), multiple_choice_answer=_value(), answers=[answer], image_id=_value("int64"),
                         answer_type=_value(), question_id=_value("int64"), question=_value(), image=_img())
    return "validation", rows, features, {}


def build_textvqa(scenes, rng):
    """lmms-eval ``textvqa_val``: a question about the text in the image, ten answers, OCR tokens, image."""
    rows = []
    for i, (scene, image) in enumerate(scenes):
        [qa] = ask(scene, ("reading",), 1)
        rows.append({"image_id": str(scene.seed), "question_id": i, "question": qa["question"],
                     "question_tokens": qa["question"].rstrip("?").split(), "image": image,
                     "image_width": image.width, "image_height": image.height, "flickr_original_url": "",
                     "flickr_300k_url": "", "answers": _ten_answers(qa["answer"], rng), "image_classes": ["shape"],
                     "set_name": "val", "ocr_tokens": [o.glyph for o in _boxes(scene)]})
    from datasets import Sequence

    features = _features(image_id=_value(), question_id=_value("int32"), question=_value(),
                         question_tokens=Sequence(_value()), image=_img(), image_width=_value("int32"),
                         image_height=_value("int32"), flickr_original_url=_value(), flickr_300k_url=_value(),
                         answers=Sequence(_value()), image_classes=Sequence(_value()), set_name=_value(),
                         ocr_tokens=Sequence(_value()))
    return "validation", rows, features, {}


MMMU_SUBJECTS = ("Math", "Art", "Physics")
MMMU_IMAGES = 7


def build_mmmu(scenes, rng):
    """lmms-eval ``mmmu_val``: id validation_<Subject>_<n>, question with <image 1>, options (a Python
    list as text), answer, question_type (multiple-choice, every fourth open), image_1..image_7."""
    rows = []
    for i, (scene, image) in enumerate(scenes):
        subject = MMMU_SUBJECTS[i % len(MMMU_SUBJECTS)]
        row = {"id": f"validation_{subject}_{i + 1}", "image_1": image,
               **{f"image_{k}": None for k in range(2, MMMU_IMAGES + 1)}, "img_type": "['Diagrams']",
               "topic_difficulty": "Easy", "subfield": "Geometry", "explanation": ""}
        if i % 4 == 3:
            [qa] = ask(scene, ("counting",), 1)
            row.update(question=f"<image 1> {qa['question'][0].upper() + qa['question'][1:]}", options="[]",
                       answer=qa["answer"], question_type="open")
        else:
            question, answer, pool = _attribute(scene, rng)
            options = _others(rng, answer, pool, 4)
            row.update(question=f"<image 1> {question[0].upper() + question[1:]}", options=repr(options),
                       answer=OPTION_LETTERS[options.index(answer)], question_type="multiple-choice")
        rows.append(row)
    features = _features(id=_value(), question=_value(), options=_value(), explanation=_value(),
                         **{f"image_{k}": _img() for k in range(1, MMMU_IMAGES + 1)}, img_type=_value(), answer=_value(),
                         topic_difficulty=_value(), question_type=_value(), subfield=_value())
    return "validation", rows, features, {}


def build_seedbench(scenes, rng):
    """lmms-eval ``seedbench``: question, choice_a..choice_d, answer letter, data_type image, image (a list)."""
    rows = []
    for i, (scene, image) in enumerate(scenes):
        question, answer, pool = _attribute(scene, rng)
        options = _others(rng, answer, pool, 4)
        rows.append({"answer": OPTION_LETTERS[options.index(answer)],
                     **{f"choice_{c.lower()}": o for c, o in zip(OPTION_LETTERS, options)},
                     "data_id": f"{scene.seed}.png", "data_type": "image", "question": question[0].upper() + question[1:],
                     "question_id": str(i), "question_type_id": 2, "image": [image], "segment": None})
    from datasets import Sequence

    features = _features(answer=_value(), **{f"choice_{c.lower()}": _value() for c in OPTION_LETTERS}, data_id=_value(),
                         data_type=_value(), question=_value(), question_id=_value(), question_type_id=_value("int16"),
                         image=Sequence(_img()), segment=Sequence(_value("int64")))
    return "test", rows, features, {}


BUILDERS = {  # lmms-eval task -> stand-in builder (variants of one benchmark share a builder)
    "gqa": build_gqa,
    "mmbench_en_dev": build_mmbench,
    "mmbench_en_dev_static": build_mmbench,
    "mme": build_mme,
    "pope": build_pope,
    "scienceqa_img": build_scienceqa,
    "vqav2_val": build_vqav2,
    "textvqa_val": build_textvqa,
    "mmmu_val": build_mmmu,
    "seedbench": build_seedbench,
}


def gqa_join_images(dataset, images_path):
    """GQA's ``process_docs`` on local data: each row's ``image`` from the images dataset by ``imageId``
    (lmms-eval's ``gqa_process_docs`` does this with the hub's testdev_balanced_images)."""
    from datasets import load_from_disk

    images = load_from_disk(str(images_path))
    images = images[next(iter(images))] if hasattr(images, "keys") else images
    by_id = {row["id"]: row["image"] for row in images}
    return dataset.map(lambda doc: {"image": by_id[doc["imageId"]].convert("RGB")})


UTILS = '''"""Written by zoo_prune.rehearsal.tasks: GQA's process_docs on the stand-in's local images."""
from zoo_prune.rehearsal.tasks import gqa_join_images

IMAGES = {images!r}


def gqa_process_docs(dataset):
    return gqa_join_images(dataset, IMAGES)
'''


def task_yaml(task: str, include: Path, dataset: Path) -> str:
    """The stand-in's YAML: lmms-eval's own task file included, the data source overridden."""
    lines = [f"# Written by zoo_prune.rehearsal.tasks: lmms-eval's {task} on a local stand-in dataset.",
             f"include: {json.dumps(str(include))}",
             f"task: {standin_name(task)}",
             "tag: []",
             f"dataset_path: {json.dumps(str(dataset))}",
             "dataset_kwargs:", "  load_from_disk: true"]
    if task == "gqa":
        lines.append("process_docs: !function utils.gqa_process_docs")
    return "\n".join(lines) + "\n"


def build_standins(out_dir, tasks, *, docs: int = 6, image_sizes=IMAGE_SIZES, seed: int = 0,
                   overwrite: bool = False) -> dict:
    """Write the stand-in datasets and task YAMLs of ``tasks`` under ``out_dir``; return the manifest.

    Written to a temporary sibling and renamed, so a failure leaves no partial output.
    """
    from datasets import Dataset, DatasetDict, disable_progress_bars, enable_progress_bars, is_progress_bar_enabled

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    unknown = [t for t in tasks if t not in BUILDERS]
    if unknown or not tasks:
        raise ValueError(f"no stand-in for task(s) {unknown or tasks!r}; known: {sorted(BUILDERS)}")
    check_int("docs", docs, minimum=2)
    check_int("seed", seed, minimum=0)
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not overwrite:
        raise ValueError(f"out_dir {str(out_dir)!r} exists; pass overwrite=True (--overwrite) to replace it")
    includes = {task: lmms_eval_task_yaml(task) for task in tasks}
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    manifest = {"generator": "zoo_prune.rehearsal.tasks", "docs": docs, "image_sizes": [list(s) for s in image_sizes], "seed": seed,
                "tasks": {}}
    bars_were_on = is_progress_bar_enabled()
    disable_progress_bars()
    try:
        (tmp / "tasks").mkdir(parents=True)
        for task in tasks:
            start = SEED_BASE + (seed * len(BUILDERS) + list(BUILDERS).index(task)) * SEEDS_PER_TASK
            scenes = [draw(start + i, image_sizes[i % len(image_sizes)]) for i in range(docs)]
            rng = np.random.default_rng([seed, list(BUILDERS).index(task)])
            split, rows, features, extra = BUILDERS[task](scenes, rng)
            name = "instructions" if extra else ""
            data = out_dir / "data" / task / name
            DatasetDict({split: Dataset.from_list(rows, features=features)}).save_to_disk(str(tmp / "data" / task / name))
            for extra_name, (extra_rows, extra_features) in extra.items():
                DatasetDict({split: Dataset.from_list(extra_rows, features=extra_features)}).save_to_disk(
                    str(tmp / "data" / task / extra_name))
            if task == "gqa":
                (tmp / "tasks" / "utils.py").write_text(UTILS.format(images=str(out_dir / "data" / task / "images")))
            yaml_name = f"{standin_name(task)}.yaml"
            (tmp / "tasks" / yaml_name).write_text(task_yaml(task, includes[task], data))
            manifest["tasks"][task] = {"standin": standin_name(task), "yaml": f"tasks/{yaml_name}",
                                       "dataset": str(data.relative_to(out_dir)), "split": split, "docs": len(rows),
                                       "includes": str(includes[task])}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars_were_on:
            enable_progress_bars()
    return manifest


def main(argv=None) -> None:
    from ..evaluation import PAPER_TASKS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (e.g. data/standins)")
    parser.add_argument("--tasks", default=",".join(PAPER_TASKS), help="comma-separated lmms-eval tasks (default: the paper's)")
    parser.add_argument("--docs", type=int, default=6, help="documents (images) per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        manifest = build_standins(args.out, args.tasks.split(","), docs=args.docs,
                                  seed=args.seed, overwrite=args.overwrite)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"error: {error}") from None
    for task, entry in manifest["tasks"].items():
        print(f"{entry['standin']}: {entry['docs']} docs ({entry['split']}) in {entry['dataset']}, includes {entry['includes']}")
    print(f"run with: --include_path {Path(args.out) / 'tasks'} --tasks {','.join(e['standin'] for e in manifest['tasks'].values())}")


if __name__ == "__main__":
    main()
