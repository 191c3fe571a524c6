"""params.yaml against pipeline/schema.py: every bad value is refused before any work, by key path and value."""

import re
import time

import pytest
import yaml

from pipeline import evaluate, schema, sensitivity, sweep
from pipeline_helpers import ROOT, small_params, write_params


def params_with(**changes) -> dict:
    """The repository's params.yaml with ``{"zoo.m": 0}``-style changes (a value of ``DELETE`` removes the key)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = params
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return params


DELETE = object()


def test_the_repository_params_are_valid():
    checked = schema.validate(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert checked["zoo"] == {"m": 64, "h": 0.01, "estimator": "auto", "seed": 0}
    checked = schema.load(ROOT / "paper" / "params.yaml")  # the paper profile: its file on top of params.yaml
    assert checked["paper"]["models"]["qwen2.5-vl-7b"]["budgets"] == [0.2, 0.1]
    assert checked["paper"]["models"]["llava-1.5-7b"]["budgets"] == [192, 128, 64]


@pytest.mark.parametrize("changes, message", [
    ({"zoo.m": 0}, "params zoo.m = 0: m must be >= 1, got m=0"),                         # range, by the method
    ({"zoo.m": 2.5}, "params zoo.m = 2.5: must be a whole number"),                      # wrong type
    ({"zoo.h": -1}, "params zoo.h = -1.0: h must be finite and > 0"),
    ({"zoo.estimator": "exact"}, "params zoo.estimator = 'exact': unknown estimator 'exact'"),
    ({"budgets": 16}, "params budgets = 16: Input should be a valid list"),               # scalar for a list
    ({"budgets": [48, 0]}, "params budgets[1] = 0: Input should be greater than or equal to 1"),
    ({"evaluate.limit": 0.5}, "params evaluate.limit = 0.5: must be a whole number (a count), not a fraction"),
    ({"sweep.limit": 0.5}, "params sweep.limit = 0.5: must be a whole number"),
    ({"sweep.h": [0.01, -1.0]}, "params sweep.h[1] = -1.0: h must be finite and > 0"),
    ({"sweep.m": [4, 0]}, "params sweep.m[1] = 0: m must be >= 1"),
    ({"proxy.threshold": 1.5}, "params proxy.threshold = 1.5: Input should be less than or equal to 1"),
    ({"proxy.form": "jvp"}, "params proxy.form = 'jvp': Input should be 'exact', 'backward' or 'finite_difference'"),
    ({"data.seed": True}, "params data.seed = True: Input should be a valid integer"),
    ({"efficiency.samples": "10"}, "params efficiency.samples = '10': Input should be a valid integer"),
    ({"zoo.mm": 3}, "params zoo.mm = 3: unknown key"),                                    # unknown key
    ({"train.steps": 3}, "params train.steps = 3: unknown key"),
    ({"baselines.foo": 1}, "params baselines.foo = 1: unknown key; no method of this section (['random']) takes an option 'foo'"),
    ({"baselines.seed": -1}, "params baselines.seed = -1: seed must be >= 0, got seed=-1 (method 'random')"),
    ({"zoo.m": DELETE}, "params zoo.m is missing"),                                       # missing key
    ({"sweep": DELETE}, "params sweep is missing"),
    ({"evaluate.baselines": ["divprune", "nope"]}, "params evaluate.baselines = ['divprune', 'nope']: unknown method(s) ['nope']"),
    ({"ablation.variants": ["zoo", "zo"]}, "params ablation.variants = ['zoo', 'zo']: unknown method(s) ['zo']"),
    ({"sensitivity.estimators": ["naive", "nope"]}, "params sensitivity.estimators = ['naive', 'nope']: unknown estimator(s) ['nope']"),
    ({"sensitivity.reference": "fused", "sensitivity.estimators": ["naive"]},
     "params sensitivity.reference = 'fused': not one of sensitivity.estimators ['naive']"),
    ({"proxy.tasks": ["existence", "colour"]}, "params proxy.tasks = ['existence', 'colour']: unknown question family ['colour']"),
    ({"paper.models.qwen2.5-vl-7b": {"pretrained": "q", "architecture": "Qwen2_5_VLForConditionalGeneration", "budgets": [1.5]}},
     "params paper.models.qwen2.5-vl-7b.budgets = [1.5]: budgets [1.5]: each is a count"),
])
def test_bad_param_is_named_by_key_and_value(changes, message):
    if "paper.models.qwen2.5-vl-7b" in changes:  # a key with dots, in the paper profile's params
        params = schema.read(ROOT / "paper" / "params.yaml")
        params["paper"]["models"]["qwen2.5-vl-7b"] = changes["paper.models.qwen2.5-vl-7b"]
    else:
        params = params_with(**changes)
    with pytest.raises(schema.ParamsError) as error:
        schema.validate(params)
    assert message in str(error.value)


def test_float_fields_take_ints_and_counts_stay_ints():
    checked = schema.validate(params_with(**{"proxy.threshold": 1, "zoo.h": 1, "evaluate.limit": None}))
    assert checked["proxy"]["threshold"] == 1.0 and isinstance(checked["proxy"]["threshold"], float)
    assert checked["zoo"]["h"] == 1.0 and checked["evaluate"]["limit"] is None
    assert isinstance(checked["budgets"][0], int)


def test_every_error_of_a_file_at_once():
    with pytest.raises(schema.ParamsError) as error:
        schema.validate(params_with(**{"budgets": 16, "evaluate.limit": 0.5, "zoo.mm": 1}))
    lines = str(error.value).splitlines()
    assert len(lines) == 3 and all(line.startswith("params ") for line in lines)


def test_invalid_yaml_names_the_line(tmp_path):
    text = (ROOT / "params.yaml").read_text().splitlines()
    line = next(i for i, t in enumerate(text) if t.startswith("budgets:"))
    text[line] = "budgets: [48, 32, 16"  # unclosed flow sequence
    (tmp_path / "params.yaml").write_text("\n".join(text) + "\n")
    with pytest.raises(schema.ParamsError, match=r"params.yaml line \d+, column \d+: invalid YAML"):
        schema.load(tmp_path / "params.yaml")
    text[line] = "budgets:\t[48]"  # a tab where YAML wants spaces
    (tmp_path / "params.yaml").write_text("\n".join(text) + "\n")
    with pytest.raises(schema.ParamsError, match=rf"params.yaml line {line + 1}, column \d+: invalid YAML"):
        schema.load(tmp_path / "params.yaml")


@pytest.mark.parametrize("module, args, changes, message", [
    (sensitivity, [], {"zoo.m": 0}, "params zoo.m = 0"),
    (sensitivity, [], {"budgets": 16}, "params budgets = 16"),
    (evaluate, ["--method", "zoo", "--keep", "16"], {"zoo.h": -1.0}, "params zoo.h = -1.0"),
    (evaluate, ["--method", "zoo", "--keep", "16"], {"evaluate.limit": 0.5}, "params evaluate.limit = 0.5"),
    (sweep, ["--over", "h"], {"sweep.h": [0.1, -1.0]}, "params sweep.h[1] = -1.0"),
])
def test_stages_refuse_bad_params_before_any_work(tmp_path, monkeypatch, module, args, changes, message):
    """One line naming the key, within a few seconds, nothing written, no lmms-eval started."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    params = small_params()
    for path, value in changes.items():
        section, key = path.split(".") if "." in path else (path, None)
        if key is None:
            params[section] = value
        else:
            params[section][key] = value
    write_params(tmp_path, params)
    started = time.perf_counter()
    with pytest.raises(SystemExit) as error:
        module.main(["--params", "params.yaml", "--model", "nowhere", *args])
    assert str(error.value).startswith("error: stage ") and message in str(error.value)
    assert len(str(error.value).splitlines()) == 1 and time.perf_counter() - started < 10
    assert not (tmp_path / "outputs").exists()


def test_method_options_of_the_registry():
    from zoo_prune import available_methods, get_method

    assert schema.method_options("random") == {"seed"}
    assert schema.method_options("zoo") >= {"m", "h", "estimator", "seed"}
    for name in available_methods():  # every option name check_option accepts is a real field
        for option in schema.method_options(name):
            get_method(name, **{option: getattr(get_method(name), option)})
    assert re.search(r"has no option 'x'", schema.check_option("divprune", "x", 1))
