"""What a stage's output folder holds, found by kind rather than by name (the report and the notebooks read
the paper profile's outputs through this): tables (``*.md``, ``*.csv``), figures (``figures/*.png``),
``metrics.json``, a skip record (``skipped.json``), and per-model subfolders (``sensitivity/<model>``,
``results/<model>``) holding the same.

    from analysis.outputs import listing, checkpoint_records
    found = listing("paper/outputs/sensitivity")   # found.status: "ran" | "skipped" | "not run"
    for name, part in found.parts.items(): ...     # per model
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SKIPPED = "skipped.json"  # pipeline._paper.SKIPPED: the record a stage of an absent model writes
FIRST = ("summary", "table")  # tables shown first in a folder (the stage's overview, then its main table)


@dataclass
class Listing:
    """A stage output folder: ``status`` ran / skipped / not run, ``reason`` (a skip's), ``markdown`` tables,
    ``csv`` tables, ``figures``, ``metrics`` (its metrics.json), ``parts`` (subfolders by name, same form)."""

    path: Path
    status: str
    reason: str = ""
    markdown: list[Path] = field(default_factory=list)
    csv: list[Path] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    metrics: dict | None = None
    parts: dict[str, "Listing"] = field(default_factory=dict)

    def csv_alone(self) -> list[Path]:
        """The CSV tables without a markdown rendering of the same name (to be rendered from the CSV)."""
        shown = {p.stem for p in self.markdown}
        return [p for p in self.csv if p.stem not in shown]

    def empty(self) -> bool:
        return not (self.markdown or self.csv or self.figures or self.metrics or self.parts)


def _order(paths) -> list[Path]:
    return sorted(paths, key=lambda p: (FIRST.index(p.stem) if p.stem in FIRST else len(FIRST), p.name))


def listing(folder) -> Listing:
    """What ``folder`` holds (see :class:`Listing`); ``not run`` when it is absent or holds nothing but
    DVC's ``.gitignore``."""
    folder = Path(folder)
    if not folder.is_dir():
        return Listing(folder, "not run")
    if (folder / SKIPPED).exists():
        record = json.loads((folder / SKIPPED).read_text())
        return Listing(folder, "skipped", reason=str(record.get("reason") or "skipped"))
    found = Listing(folder, "ran", markdown=_order(folder.glob("*.md")), csv=_order(folder.glob("*.csv")),
                    figures=sorted((folder / "figures").glob("*.png")) + sorted(folder.glob("*.png")))
    if (folder / "metrics.json").exists():
        found.metrics = json.loads((folder / "metrics.json").read_text())
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in ("figures",) and not p.name.startswith(".")):
        part = listing(sub)
        if part.status != "ran" or not part.empty():
            found.parts[sub.name] = part
    if found.empty():
        found.status = "not run"
    return found


def checkpoint_records(outputs) -> dict[str, dict]:
    """``{model: record}`` of ``<outputs>/checkpoints/<model>/checkpoint.json`` (the checkpoints stage's)."""
    folder = Path(outputs) / "checkpoints"
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("*/checkpoint.json"))}


def show(found: Listing, level: int = 3) -> None:
    """A notebook's view of a stage folder: its markdown tables, CSV tables without one, figures, then each
    subfolder (model) under a heading; a folder not run or skipped says so."""
    import pandas as pd
    from IPython.display import Image, Markdown, display

    if found.status != "ran":
        display(Markdown(f"*`{found.path}`: {found.status}*" + (f": {found.reason}" if found.reason else "")))
        return
    for path in found.markdown:
        display(Markdown(path.read_text()))
    for path in found.csv_alone():
        display(Markdown(f"`{path.name}`:"))
        display(pd.read_csv(path))
    for path in found.figures:
        display(Image(filename=str(path)))
    for name, part in found.parts.items():
        display(Markdown(f"{'#' * level} {name}"))
        show(part, level + 1)
