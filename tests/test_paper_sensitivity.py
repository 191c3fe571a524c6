"""The sensitivity and proxy stages under the paper profile, on random-weight stand-ins of the paper's
checkpoints and tasks (``paper_standins``), the way paper/dvc.yaml runs them.

The params are the rehearsal's (``pipeline_helpers.paper_params``) with the models in float16 (the paper's
dtype), so that the stages' float32 arithmetic is exercised. Expected token counts are worked by hand from
the stand-ins' real geometry (336 px, patch 14): LLaVA-1.5 24 x 24 = 576 tokens per image; LLaVA-NeXT on
the 672 x 672 document 0 of gqa_standin: the 2 x 2 crop pinpoint, base 576 + 4 x 576 crop tokens, budget
160 = 32 per patch: base 32, crops 4 x 32; Qwen2.5-VL on it: 48 x 48 patches, 2 x 2 merge -> 576 tokens,
10 % -> round(57.6) = 58.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from pipeline_helpers import ROOT, paper_params

from pipeline import _paper, plan, proxy, sensitivity

ABSENT = "llava-1.5-13b"  # its checkpoint points nowhere here


def write_profile(folder: Path, standins: Path, **paper) -> Path:
    """A paper-profile folder on the stand-ins, float16, ``llava-1.5-7b`` at two budgets, :data:`ABSENT` absent."""
    path = paper_params(folder, standins, dtype="float16", **paper)
    raw = yaml.safe_load(path.read_text())
    raw["paper"]["models"][ABSENT]["pretrained"] = str(folder / "not-downloaded")
    raw["paper"]["models"]["llava-1.5-7b"]["budgets"] = [64, 16]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    plan.write(path)
    return path


@pytest.fixture(scope="module")
def profile(tmp_path_factory, paper_standins):
    return write_profile(tmp_path_factory.mktemp("paper"), paper_standins)


@pytest.fixture
def drawn(monkeypatch):
    """Every text on the face of each figure the stages save (title, note, annotations; line breaks as
    spaces), by file name."""
    texts = {}
    save = sensitivity.figures.save

    def spy(figure, path):
        artists = [figure._suptitle, *figure.texts, *(t for ax in figure.axes for t in [*ax.texts, ax.title])]
        words = " ".join(t.get_text() for t in artists if t is not None).split()
        texts[Path(path).name] = " ".join(words)  # wrapped lines joined
        return save(figure, path)

    monkeypatch.setattr(sensitivity.figures, "save", spy)
    return texts


def run_sensitivity(profile: Path, model: str) -> Path:
    out = profile.parent / "outputs" / "sensitivity" / model
    sensitivity.main(["--params", str(profile), "--paper-model", model, "--out", str(out)])
    return out


def rehearsal_note(profile: Path, model: str) -> str:
    return _paper.weights_note(_paper.availability(yaml.safe_load(profile.read_text()), model))


@pytest.mark.parametrize("model, expected", [
    ("llava-1.5-7b", {("image", 64): 64, ("image", 16): 16}),
    ("llava-next-7b", {("base patch", 160): 32, ("crops", 160): 4 * 32}),
    ("qwen2.5-vl-7b", {("image", 0.1): 58}),
])
def test_sensitivity_measures_the_model_and_draws_each_budget(profile, drawn, model, expected):
    out = run_sensitivity(profile, model)
    assert {p.name for p in out.iterdir()} == {"sensitivities.npz", "agreement.csv", "estimators.csv", "overlays.csv",
                                               "metrics.json", "figures"}
    metrics = json.loads((out / "metrics.json").read_text())
    note = rehearsal_note(profile, model)
    assert note.startswith("RANDOM-WEIGHT REHEARSAL") and model in note and metrics["note"] == note
    for name in ("agreement.png", "overlays.png"):
        assert note in drawn[name] and (out / "figures" / name).stat().st_size > 5_000
    # overlays: DivPrune and ZOO-Prune at every budget of the model, each keeping its budget (per patch)
    overlays = pd.read_csv(out / "overlays.csv")
    assert (overlays["note"] == note).all() and set(overlays["method"]) == {"divprune", "zoo"}
    drawn_counts = {(row.view, float(row.keep), row.method): row.kept for row in overlays.itertuples()}
    assert drawn_counts == {(view, float(keep), method): kept for (view, keep), kept in expected.items()
                            for method in ("divprune", "zoo")}
    # the estimators on the model's own X, in float32 although the model is float16
    scores = np.load(out / "sensitivities.npz")
    assert scores["tokens"][0] == {"llava-1.5-7b": 576, "llava-next-7b": 576 + 4 * 576, "qwen2.5-vl-7b": 576}[model]
    assert scores["naive"].dtype == np.float32 and len(scores["naive"]) == scores["tokens"].sum()
    assert list(scores["doc_id"]) == [0, 1] and metrics["samples"] == 2
    estimators = pd.read_csv(out / "estimators.csv").set_index("estimator")
    assert (estimators["note"] == note).all()
    agreement = pd.read_csv(out / "agreement.csv", index_col=0)
    if model == "qwen2.5-vl-7b":  # the merger (RMSNorm, then an MLP over 4 patches) is no Linear-act-Linear
        assert list(estimators.index[estimators["runs"]]) == ["naive"] and list(agreement.index) == ["naive"]
        assert estimators.loc["fused", "not_applicable"].startswith("estimator='fused' needs a Linear-activation-Lin")
    else:  # fused is exact: the same values as naive (float16 arithmetic would make naive's differences noise)
        assert estimators["runs"].all() and agreement.loc["fused", "naive"] > 0.999
        assert np.allclose(scores["fused"], scores["naive"], rtol=1e-3, atol=1e-5)
    paper_estimator = "lowrank" if model == "llava-next-7b" else None  # paper.models.<m>.estimator
    assert metrics["paper_estimator"] == paper_estimator
    assert metrics["overlay_zoo_estimator"] == (paper_estimator or "auto")


def test_an_absent_checkpoint_is_skipped_by_name(profile, paper_standins, tmp_path):
    out = run_sensitivity(profile, ABSENT)
    assert [p.name for p in out.iterdir()] == ["skipped.json"]
    record = json.loads((out / "skipped.json").read_text())
    assert record["model"] == ABSENT and record["stage"] == f"sensitivity/{ABSENT}" and not record["available"]
    assert "not-downloaded" in record["reason"]
    absent = write_profile(tmp_path / "absent", paper_standins, proxy={"model": ABSENT})
    proxy.main(["--params", str(absent), "--out", str(tmp_path / "proxy")])
    assert [p.name for p in (tmp_path / "proxy").iterdir()] == ["skipped.json"]
    assert json.loads((tmp_path / "proxy" / "skipped.json").read_text())["model"] == ABSENT


def test_proxy_refuses_a_model_it_cannot_walk(paper_standins, tmp_path):
    params = write_profile(tmp_path / "next", paper_standins, proxy={"model": "llava-next-7b"})
    with pytest.raises(SystemExit, match="error: stage proxy: paper.proxy.model = 'llava-next-7b' is a "
                                         "LlavaNextForConditionalGeneration"):
        proxy.main(["--params", str(params), "--out", str(tmp_path / "proxy")])
    assert not (tmp_path / "proxy").exists()


def test_proxy_on_mmmu_and_pope_beside_the_papers_rho(profile, drawn, monkeypatch):
    documents = _paper.task_documents

    def first_mmmu_text_only(params, task, limit):  # MMMU has questions without an image
        docs = documents(params, task, limit)
        if task.startswith("mmmu"):
            docs[0]["images"] = []
        return docs

    monkeypatch.setattr(_paper, "task_documents", first_mmmu_text_only)
    out = profile.parent / "outputs" / "proxy"
    proxy.main(["--params", str(profile), "--out", str(out)])
    assert {p.name for p in out.iterdir()} == {"rhos.csv", "summary.csv", "metrics.json", "figures"}
    rhos = pd.read_csv(out / "rhos.csv")
    assert rhos.groupby("task").size().to_dict() == {"mmmu_val_standin": 1, "pope_standin": 2}
    assert list(rhos.loc[rhos.task == "mmmu_val_standin", "id"]) == [1] and rhos["rho"].between(-1, 1).all()
    note = rehearsal_note(profile, "llava-1.5-7b")
    assert (rhos["note"] == note).all()
    with open(ROOT / "analysis" / "paper_numbers.csv") as handle:  # Fig. 2's published mean rho
        published = {r["benchmark"]: float(r["value"]) for r in csv.DictReader(handle) if r["table"] == "fig2"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["paper_mean_rho/mmmu_val_standin"] == published["mmmu"]
    assert metrics["paper_mean_rho/pope_standin"] == published["pope"]
    assert metrics["text_only_skipped/mmmu_val_standin"] == 1 and metrics["text_only_skipped/pope_standin"] == 0
    assert metrics["mean_rho/pope_standin"] == pytest.approx(rhos.loc[rhos.task == "pope_standin", "rho"].mean())
    summary = pd.read_csv(out / "summary.csv").set_index("task")
    assert summary.loc["pope_standin", "paper's mean rho"] == published["pope"]
    assert summary.loc["mmmu_val_standin", "text-only documents skipped"] == 1
    assert note in drawn["proxy_kde.png"] and f"the paper's {published['mmmu']:.2f}" in drawn["proxy_kde.png"]
