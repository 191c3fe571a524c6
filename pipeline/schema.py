"""The schema of ``params.yaml``: one pydantic model per section, checked before a stage does any work.

    params = validate(load_yaml("params.yaml"))      # a plain dict of checked values; ParamsError otherwise

Every error names the key path and the value (``params zoo.m = 0: m must be >= 1, got m=0``), all
errors of a file at once. Numbers are strict: a count refuses ``0.5`` and ``true`` (lmms-eval would
read ``limit: 0.5`` as a fraction of every task) and ``"3"``; a float field takes an int
(``proxy.threshold: 1``); a list refuses a scalar (``budgets: 16``); unknown and missing keys are errors.

Where a value belongs to a library object, the library checks it (one home for each range):

* a method's options live in the section its registry entry names (``method_class(name).params_section``:
  ``zoo`` for ZOO-Prune and its variants, ``baselines`` for ``random``'s ``seed``): each key is checked
  by ``zoo_prune.get_method(method, key=value)`` for each method of that section that takes it, so
  a method's ranges are its own and a key no method of the section takes is unknown (``sweep.h``
  and ``sweep.m`` values likewise, by ``zoo``);
* method lists (``evaluate.zoo_methods``, ``evaluate.baselines``, ``ablation.variants``) are checked
  against ``zoo_prune.available_methods()``; estimators against ``zoo_prune.sensitivity.ESTIMATORS``;
  testbed question families against ``zoo_prune.testbed.questions.FAMILIES``;
* ``train`` keys are the flags of ``python -m zoo_prune.testbed.train`` (its ``TrainConfig`` and
  model-size fields, whose defaults stay there); a key left out takes the CLI's default.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

Count = Annotated[int, Field(ge=1)]  # strict: 0.5, True and "3" are refused
NonNegative = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Names = Annotated[list[str], Field(min_length=1)]


class ParamsError(ValueError):
    """params.yaml cannot be used: invalid YAML, or values that break the schema (each named by key path)."""


class Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


def _library(module: str = ""):
    """``zoo_prune`` (or one of its modules), imported on first use: only the checks of sections that name
    methods, estimators, question families or training flags need it, and every stage reading those
    sections lists ``zoo_prune`` in its dvc.yaml deps. The data stage, which reads none of them, thus
    depends on the testbed generator alone (tests/test_dvc_deps.py follows import statements)."""
    return importlib.import_module(f"zoo_prune.{module}" if module else "zoo_prune")


def _problem(message: str, **context) -> PydanticCustomError:
    return PydanticCustomError("params", message.replace("{", "{{").replace("}", "}}"), context)


def _methods(names: list[str]) -> list[str]:
    available_methods = _library().available_methods
    unknown = [n for n in names if n not in available_methods()]
    if unknown:
        raise _problem(f"unknown method(s) {unknown}; registered: {available_methods()}")
    return names


def _families(names):
    FAMILIES = _library("testbed.questions").FAMILIES
    unknown = [n for n in ([names] if isinstance(names, str) else names) if n not in FAMILIES]
    if unknown:
        raise _problem(f"unknown question family {unknown}; choose from {list(FAMILIES)}")
    return names


def method_options(method: str) -> set[str]:
    """The option names of a registered method."""
    return set(_library().method_class(method).options())


def section_methods(section: str) -> list[str]:
    """The registered methods whose options live in params section ``section``."""
    library = _library()
    return [m for m in library.available_methods() if library.method_class(m).params_section == section]


def check_option(method: str, key: str, value) -> str | None:
    """The library's own complaint about ``method``'s option ``key = value``, or None."""
    try:
        _library().get_method(method, **{key: value})
    except (ValueError, TypeError) as error:
        return f"{error} (method {method!r})"
    return None


# ---------------------------------------------------------------- sections


class Wandb(Section):
    project: str
    group: str | None
    samples: NonNegative  # per task: questions in each evaluate run's W&B table


class Data(Section):
    train: NonNegative
    validation: NonNegative
    test: Count
    train_per_family: Count
    seed: NonNegative


@functools.cache
def _train_model() -> type[Section]:
    """``train``: the training CLI's flags, typed from ``TrainConfig`` / ``TestbedConfig``; all optional."""
    train = _library("testbed.train")
    CLI_FIELDS, MODEL_CLI_FIELDS, defaults = train.CLI_FIELDS, train.MODEL_CLI_FIELDS, train.TrainConfig()
    fields = {"seed": (NonNegative | None, None), "threads": (Count | None, None),
              "a_glyph_boxes_only": (bool | None, None)}
    for name in CLI_FIELDS:
        value = getattr(defaults, name)
        kind = Annotated[float, Field(ge=0)] if isinstance(value, float) else NonNegative
        fields[name] = (kind | None, None)
    for name in MODEL_CLI_FIELDS:
        fields[name] = (Count | None, None)
    return create_model("Train", __base__=Section, **fields)




class Zoo(Section):
    """Types here; ranges and choices by the methods themselves (checked in :class:`Params`)."""

    m: int
    h: float
    estimator: str
    seed: int | None
    rank: int | None = None


class Sensitivity(Section):
    task: str
    samples: Count
    estimators: Names
    rank: Count
    reference: str
    overlay_samples: NonNegative

    _task = field_validator("task")(classmethod(lambda cls, v: _families(v)))

    @field_validator("estimators")
    @classmethod
    def _estimators(cls, names):
        ESTIMATORS = _library("sensitivity").ESTIMATORS
        unknown = [n for n in names if n not in ESTIMATORS]
        if unknown:
            raise _problem(f"unknown estimator(s) {unknown}; choose from {list(ESTIMATORS)}")
        return names

    @field_validator("reference")
    @classmethod
    def _reference(cls, name, info):
        estimators = info.data.get("estimators")
        if estimators is not None and name not in estimators:
            raise _problem(f"not one of sensitivity.estimators {estimators}")
        return name


class Proxy(Section):
    tasks: Names
    samples: Count
    threshold: Fraction
    form: Literal["exact", "backward", "finite_difference"]
    directions: Count
    exact_samples: NonNegative  # per task: first images also measured exactly; 0 = none

    _tasks = field_validator("tasks")(classmethod(lambda cls, v: _families(v)))


class Evaluate(Section):
    tasks: Names
    limit: Count | None  # questions per task; lmms-eval reads a float as a fraction: refused
    batch_size: Count
    zoo_methods: list[str]
    baselines: list[str]
    seeded_methods: list[str]  # run again at each of `seeds` (the stochastic ones)
    seeds: list[NonNegative]

    _methods = field_validator("zoo_methods", "baselines", "seeded_methods")(classmethod(lambda cls, v: _methods(v)))


class Results(Section):
    """The statistics of the results stage (which methods ``reference`` / ``mcnemar`` may name is the
    stage's check: it needs ``evaluate``'s lists)."""

    reference: str
    mcnemar: Annotated[list[str], Field(min_length=2, max_length=2)]
    confidence: Annotated[float, Field(gt=0, lt=1)]
    resamples: Count
    seed: NonNegative


class Ablation(Section):
    variants: Names

    _methods = field_validator("variants")(classmethod(lambda cls, v: _methods(v)))


class Sweep(Section):
    task: str
    keep: Count
    limit: Count | None
    batch_size: Count
    h: Annotated[list[float], Field(min_length=1)]
    m: Annotated[list[int], Field(min_length=1)]


class Efficiency(Section):
    samples: Count
    new_tokens: Count
    repeats: Count
    text_tokens: Count
    layer_tokens: Annotated[list[Count], Field(min_length=1)]
    layer_repeats: Count
    threads: Count  # torch threads while timing (zoo_prune.timing pins them)


class PaperModel(Section):
    pretrained: str  # a hub id (read from the Hugging Face cache) or a local folder
    architecture: str  # the checkpoint's transformers class: its adapter says which methods apply (the plan)
    budgets: Annotated[list[float], Field(min_length=1)]  # counts (192) or ratios of the tokens (0.2)
    estimator: str | None = None
    methods: list[str] | None = None  # this model's methods instead of paper.methods (a smaller grid)

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, budgets):
        bad = [b for b in budgets if not (0 < b < 1 or (b >= 1 and float(b).is_integer()))]
        if bad:
            raise _problem(f"budgets {bad}: each is a count of tokens (an integer >= 1) or a ratio in (0, 1)")
        return [int(b) if b >= 1 else b for b in budgets]

    @field_validator("methods")
    @classmethod
    def _methods(cls, names):
        return names if names is None else _methods(names)

    @field_validator("architecture")
    @classmethod
    def _architecture(cls, name):
        adapters = _library("adapters")
        if adapters.adapter_class(name) is None:
            raise _problem(f"no zoo_prune adapter for {name!r}; adapters: {sorted(adapters.supported_models())}")
        return name


class PaperSensitivity(Section):
    """The sensitivity stage under the paper profile: real features of benchmark images, per model."""

    task: str  # lmms-eval task whose images are measured and drawn (Fig. 6: GQA)
    samples: Count
    overlay_samples: NonNegative  # images drawn: DivPrune vs ZOO-Prune at each of the model's budgets
    rank: Count | None = None  # lowrank's k_r in the agreement table (None: ../params.yaml sensitivity.rank)


class PaperProxy(Section):
    model: str  # Fig. 2: LLaVA-1.5-7B
    tasks: Names  # lmms-eval tasks whose documents are measured (MMMU, POPE)
    samples: Count  # per task


class PaperAblation(Section):
    model: str  # Table 5: LLaVA-NeXT-7B (the variants of ../params.yaml ablation.variants run on it)


class PaperSweep(Section):
    model: str  # Fig. 4: LLaVA-1.5-7B
    task: str  # POPE
    keep: float  # one of the model's budgets (64)
    limit: Count | None  # documents (null = the whole task)

    @field_validator("keep")
    @classmethod
    def _keep(cls, keep):
        return int(keep) if keep >= 1 and float(keep).is_integer() else keep  # a count as budgets give it (64, not 64.0)


class PaperEfficiency(Section):
    model: str  # Fig. 5: LLaVA-NeXT-7B
    task: str  # ScienceQA (images)
    samples: Count  # documents timed per method and budget
    new_tokens: Count  # end-to-end latency: prefill + this many greedy tokens
    warmup: Count  # untimed runs first
    repeats: Count  # timed runs: the median is reported


class Paper(Section):
    dir: str  # the profile's folder (paper/): its outputs go to <dir>/outputs, its plan to <dir>/plan.yaml
    device: str
    dtype: Literal["float16", "bfloat16", "float32", "auto"]
    num_processes: Count
    batch_size: Count
    limit: Count | None  # documents per task (null = all)
    include_path: str | None  # a folder of extra lmms-eval task YAMLs (local copies of the data; the rehearsal's)
    tasks: Names
    benchmarks: dict[str, str]  # task -> the paper's column it fills
    task_notes: dict[str, str]  # where a task differs from what the paper ran
    methods: Names  # the pruning methods of Tables 1-4 (each on the models whose adapter supports its kind)
    seeds: list[NonNegative]  # the stochastic methods again at these seeds (beside zoo.seed / baselines.seed)
    models: Annotated[dict[str, PaperModel], Field(min_length=1)]
    sensitivity: PaperSensitivity
    ablation: PaperAblation
    proxy: PaperProxy
    sweep: PaperSweep
    efficiency: PaperEfficiency

    _methods = field_validator("methods")(classmethod(lambda cls, v: _methods(v)))

    @model_validator(mode="after")
    def _references(self):
        problems = []
        for key in ("ablation", "proxy", "sweep", "efficiency"):
            name = getattr(self, key).model
            if name not in self.models:
                problems.append(f"paper.{key}.model = {name!r}: not one of paper.models {list(self.models)}")
        if self.sweep.model in self.models and self.sweep.keep not in self.models[self.sweep.model].budgets:
            problems.append(f"paper.sweep.keep = {self.sweep.keep!r}: not one of paper.models.{self.sweep.model}.budgets "
                            f"{self.models[self.sweep.model].budgets}")
        unmapped = [t for t in self.tasks if t not in self.benchmarks]
        if unmapped:
            problems.append(f"paper.tasks {unmapped}: missing from paper.benchmarks (the paper's column each fills)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Params(Section):
    profile: Literal["testbed", "paper"]
    wandb: Wandb
    data: Data
    train: dict[str, Any]  # checked by the training CLI's own fields (_train_model)
    budgets: Annotated[list[Count], Field(min_length=1)]
    zoo: Zoo
    baselines: dict[str, Any]
    sensitivity: Sensitivity
    proxy: Proxy
    evaluate: Evaluate
    results: Results
    ablation: Ablation
    sweep: Sweep
    efficiency: Efficiency
    paper: Paper | None = None  # the paper profile's section: paper/params.yaml


# ---------------------------------------------------------------- checks the methods own


def _section_errors(section: str, options: dict) -> list[str]:
    """Each key of a method-options section, checked by the methods whose options live there."""
    errors = []
    methods = section_methods(section)
    for key, value in options.items():
        takers = [m for m in methods if key in method_options(m)]
        if not takers:
            errors.append(f"params {section}.{key} = {value!r}: unknown key; no method of this section ({methods}) "
                          f"takes an option {key!r}")
        for method in takers:
            if (problem := check_option(method, key, value)) is not None:
                errors.append(f"params {section}.{key} = {value!r}: {problem}")
                break
    return errors


def _train_errors(options: dict) -> list[str]:
    try:
        _train_model().model_validate(options)
    except ValidationError as error:
        return [_message(e | {"loc": ("train", *e["loc"])}) for e in error.errors()]
    return []


def _method_errors(checked) -> list[str]:
    """``zoo``, ``baselines``, ``sweep.h`` / ``sweep.m`` and ``paper.models.*.estimator``, by the methods."""
    errors = []
    if "zoo" in type(checked).model_fields:
        errors += _section_errors("zoo", checked.zoo.model_dump(exclude_unset=True))
    if "baselines" in type(checked).model_fields:
        errors += _section_errors("baselines", checked.baselines)
    if "sweep" in type(checked).model_fields:
        for key in ("h", "m"):
            for i, value in enumerate(getattr(checked.sweep, key)):
                if (problem := check_option("zoo", key, value)) is not None:
                    errors.append(f"params sweep.{key}[{i}] = {value!r}: {problem}")
    if "paper" in type(checked).model_fields and checked.paper is not None:
        for name, spec in checked.paper.models.items():
            if spec.estimator is not None and (problem := check_option("zoo", "estimator", spec.estimator)) is not None:
                errors.append(f"params paper.models.{name}.estimator = {spec.estimator!r}: {problem}")
    return errors


@functools.cache
def _model_of(names: tuple[str, ...]) -> type[BaseModel]:
    """:class:`Params` restricted to the sections ``names`` (a stage checks what it reads)."""
    fields = {n: (f.annotation, f) for n, f in Params.model_fields.items() if n in names}
    return create_model("Params", __config__=ConfigDict(strict=True, extra="ignore"), **fields)


# ---------------------------------------------------------------- entry points


def _path(loc) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(part, str) and not part.startswith(("function-", "int", "float", "str", "none")):
            text += ("." if text else "") + part
    return text


def _message(error: dict) -> str:
    path = _path(error["loc"])
    if error["type"] == "missing":
        return f"params {path} is missing"
    if error["type"] == "extra_forbidden":
        return f"params {path} = {error['input']!r}: unknown key"
    if not path:  # a model validator's message about a whole section
        return f"params: {error['msg']}"
    value, message = error["input"], error["msg"]
    if error["type"] == "int_type" and isinstance(value, float):
        message = "must be a whole number (a count), not a fraction"
    return f"params {path} = {value!r}: {message}"


def validate(params, sections=None) -> dict:
    """The checked params as plain data (ints where counts are meant, floats where floats are).

    ``sections``: the top-level keys to check (default: all); unknown top-level keys are always errors.
    """
    if not isinstance(params, dict):
        raise ParamsError(f"params must be a mapping of sections, got {type(params).__name__}: {params!r}")
    names = tuple(Params.model_fields) if sections is None else tuple(sections)
    unknown = [f"params {key} = {params[key]!r}: unknown section; params.yaml has {list(Params.model_fields)}"
               for key in params if key not in Params.model_fields]
    if unknown:
        raise ParamsError("\n".join(unknown))
    try:
        checked = _model_of(names).model_validate(params)
    except ValidationError as error:
        raise ParamsError("\n".join(_message(e) for e in error.errors())) from None
    errors = _method_errors(checked) + (_train_errors(checked.train) if "train" in names else [])
    if errors:
        raise ParamsError("\n".join(errors))
    data = checked.model_dump()
    for name in ("zoo", "paper"):  # a key left out keeps its home default (the CLI's, the method's)
        if data.get(name) is not None:
            data[name] = getattr(checked, name).model_dump(exclude_unset=True)
    return {**params, **data}  # sections not asked for stay as read


def load_yaml(path) -> Any:
    """The parsed YAML file; invalid YAML is a :class:`ParamsError` naming the file, line and column."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(p) for p in (getattr(error, "context", None), getattr(error, "problem", None)) if p)
        raise ParamsError(f"{path}{where}: invalid YAML: {problem or error}") from None


def merge(base: dict, over: dict) -> dict:
    """``base`` with ``over``'s keys set: mappings merge key by key, anything else (lists too) is replaced."""
    merged = dict(base)
    for key, value in over.items():
        merged[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def read(path="params.yaml", _seen=()) -> dict:
    """The params of a file, resolving ``base:``: a profile's file (paper/params.yaml) names the file it
    sets keys of (``base: ../params.yaml``, relative to itself), so each value has one home."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file {str(path)!r} not found" + (f" (the base of {str(_seen[-1])!r})" if _seen else ""))
    if path.resolve() in _seen:
        raise ParamsError(f"params file {str(path)!r}: its base chain loops ({' -> '.join(map(str, _seen))})")
    params = load_yaml(path) or {}
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: params must be a mapping of sections, got {type(params).__name__}")
    base = params.pop("base", None)
    if base is None:
        return params
    if not isinstance(base, str):
        raise ParamsError(f"{path}: base = {base!r} must be the path of a params file")
    return merge(read(path.parent / base, (*_seen, path.resolve())), params)


def load(path="params.yaml", sections=None) -> dict:
    """:func:`read` (with its ``base`` chain) then :func:`validate` (of ``sections``, default all)."""
    return validate(read(path), sections)
