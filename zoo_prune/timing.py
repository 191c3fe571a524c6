"""Wall-clock timing with its conditions: the one helper the efficiency stage and the benchmarks use.

    from zoo_prune.timing import Session, time_call

    with Session(threads=2) as session:                      # pins torch's threads, records the load
        timing = session.time(lambda: model(**inputs), repeats=5)
    timing.median, timing.minimum, timing.maximum            # seconds
    session.conditions()                                     # threads, cores, load before / after, flags

    with Parts(device="cuda") as parts:                      # seconds inside named calls of each repeat
        parts.wrap(method, "sensitivity", "sensitivity")     # an object's method (instance attribute)
        parts.wrap(language_model, "forward", "llm")         # or a module's forward
        timing = session.time(lambda: model(**inputs), repeats=5, device="cuda", parts=parts)
    timing.part("llm")                                       # median over the repeats of its seconds

Every timing runs ``warmup`` untimed calls first, synchronises CUDA around each timed call when
the work runs on a GPU (``device``), and keeps every repeat, so the median, minimum and maximum are
all there. :class:`Parts` splits each timed call into the seconds spent inside named calls, each part
exclusive of the parts nested in it (a method's sensitivity inside its selection counts once, as
sensitivity), CUDA synchronised around each. :func:`peak_memory` reads the CUDA allocator's peak.

A timing is **flagged** (and must be reported as such, never as a result) when

* the machine was loaded: the 1-minute load average before the session, or after it minus the
  session's own threads (which it keeps busy), exceeds ``LOADED_FRACTION`` of the cores; or
* its repeats spread too far: ``(max - min) / median > MAX_SPREAD`` and ``max - min > MIN_JITTER_S``.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

# Load of other processes, as a fraction of the cores, above which a timing session is "loaded".
LOADED_FRACTION = 0.5
# Relative spread (max - min) / median of one timing's repeats above which it is flagged ...
MAX_SPREAD = 0.5
# ... when the spread is also above this many seconds (a millisecond of jitter on a 2 ms step is not
# a loaded machine).
MIN_JITTER_S = 0.002


def load_average() -> float:
    """The 1-minute load average (0.0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass
class Timing:
    """Seconds of each timed repeat (after warm-up) and their statistics."""

    seconds: list[float]
    warmup: int = 1
    parts: list[dict] = field(default_factory=list)  # per timed repeat: {part: seconds} (with a Parts timer)

    def __post_init__(self):
        if not self.seconds:
            raise ValueError("a Timing needs at least one timed repeat")

    def part(self, name: str) -> float:
        """Median over the repeats of the seconds spent in part ``name`` (0 in a repeat that never entered it)."""
        if not self.parts:
            raise ValueError("this timing was taken without a Parts timer")
        return statistics.median(p.get(name, 0.0) for p in self.parts)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def minimum(self) -> float:
        return min(self.seconds)

    @property
    def maximum(self) -> float:
        return max(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median of the repeats."""
        return (self.maximum - self.minimum) / self.median if self.median > 0 else 0.0

    @property
    def unsteady(self) -> bool:
        return len(self.seconds) > 1 and self.spread > MAX_SPREAD and self.maximum - self.minimum > MIN_JITTER_S

    def summary(self, scale: float = 1.0, prefix: str = "") -> dict:
        """``{prefix}median``, ``min``, ``max`` (times ``scale``, e.g. 1000 for ms), repeats, spread flag."""
        return {f"{prefix}median": self.median * scale, f"{prefix}min": self.minimum * scale,
                f"{prefix}max": self.maximum * scale, f"{prefix}repeats": len(self.seconds),
                f"{prefix}unsteady": self.unsteady}


def _synchronise(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device) -> None:
    """Start a new peak of the CUDA allocator on ``device`` (nothing elsewhere)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> int | None:
    """Bytes at the CUDA allocator's peak on ``device`` since :func:`reset_peak_memory` (tensors only, as
    ``torch.cuda.max_memory_allocated`` counts them); None off CUDA (no allocator peak to read)."""
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


class Parts:
    """Seconds spent inside named calls while a timed call runs, each part exclusive of the parts nested
    in it, CUDA synchronised around each call (``device``). :meth:`wrap` times an object's method (set
    as an instance attribute, so the object's own ``self.<name>(...)`` calls are timed too, and a
    module's ``forward`` as its ``__call__`` runs it); leaving the ``with`` block (or :meth:`remove`)
    puts every wrapped attribute back. :meth:`take` returns the seconds since the last take."""

    def __init__(self, device=None, clock: Callable[[], float] = time.perf_counter):
        self.device, self.clock = device, clock
        self.seconds: dict[str, float] = {}
        self._nested: list[float] = []
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner, attribute: str, part: str) -> None:
        original = getattr(owner, attribute)
        own = attribute in vars(owner)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            self._enter()
            try:
                return original(*args, **kwargs)
            finally:
                self._exit(part)

        setattr(owner, attribute, timed)
        self._undo.append(lambda: setattr(owner, attribute, original) if own else delattr(owner, attribute))

    def _enter(self) -> None:
        _synchronise(self.device)
        self._nested.append(self.clock())
        self._nested.append(0.0)  # seconds of the parts nested in this one

    def _exit(self, part: str) -> None:
        _synchronise(self.device)
        nested = self._nested.pop()
        elapsed = self.clock() - self._nested.pop()
        self.seconds[part] = self.seconds.get(part, 0.0) + elapsed - nested
        if self._nested:
            self._nested[-1] += elapsed

    def take(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, {}
        return seconds

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> "Parts":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def time_call(call: Callable[[], object], *, repeats: int = 3, warmup: int = 1, device=None,
              max_seconds: float | None = None, clock: Callable[[], float] = time.perf_counter,
              parts: Parts | None = None) -> Timing:
    """Time ``call()``: ``warmup`` untimed calls, then ``repeats`` timed ones (fewer, but at least one,
    once ``max_seconds`` of timed work is spent). ``device``: CUDA work is synchronised around each call.
    ``parts``: a :class:`Parts` timer whose seconds of each timed call the Timing keeps. ``clock`` is
    injectable for tests."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got repeats={repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got warmup={warmup!r}")
    for _ in range(warmup):
        call()
    seconds: list[float] = []
    split: list[dict] = []
    while len(seconds) < repeats:
        if parts is not None:
            parts.take()
        _synchronise(device)
        start = clock()
        call()
        _synchronise(device)
        seconds.append(clock() - start)
        if parts is not None:
            split.append(parts.take())
        if max_seconds is not None and sum(seconds) >= max_seconds:
            break
    return Timing(seconds, warmup, split)


@dataclass
class Session:
    """A timing session: pins torch's thread count (``threads``; None keeps it), records the load
    average before and after, and collects every :class:`Timing` taken through :meth:`time`."""

    threads: int | None = None
    settle: float = 0.0  # seconds at most to wait, before timing, for the load of what ran just before to decay
    timings: dict = field(default_factory=dict)
    load_before: float | None = None
    load_after: float | None = None
    settled_seconds: float = 0.0
    _previous_threads: int | None = None

    def __enter__(self) -> "Session":
        if self.threads is not None:
            if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
                raise ValueError(f"threads must be an int >= 1, got threads={self.threads!r}")
            self._previous_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        start = time.monotonic()
        # The 1-minute load average lags: processes that just ended (a pipeline's previous stage)
        # still count for a minute. Wait up to ``settle`` seconds for it to fall below the limit.
        while time.monotonic() - start < self.settle and load_average() > LOADED_FRACTION * cores():
            time.sleep(min(2.0, self.settle))
        self.settled_seconds = time.monotonic() - start
        self.load_before = load_average()
        return self

    def __exit__(self, *exc) -> None:
        self.load_after = load_average()
        if self._previous_threads is not None:
            torch.set_num_threads(self._previous_threads)
            self._previous_threads = None

    def time(self, call: Callable[[], object], *, name: str | None = None, **options) -> Timing:
        timing = time_call(call, **options)
        if name is not None:
            self.timings[name] = timing
        return timing

    @property
    def loaded(self) -> bool:
        """Other processes used more than ``LOADED_FRACTION`` of the cores before or during the session."""
        limit = LOADED_FRACTION * cores()
        own = self.threads if self.threads is not None else torch.get_num_threads()
        before = self.load_before if self.load_before is not None else load_average()
        after = self.load_after if self.load_after is not None else load_average()
        return before > limit or max(0.0, after - own) > limit

    def conditions(self) -> dict:
        """What a timing report must carry: threads, cores, load before / after, the loaded flag and
        the names of unsteady timings (spread above ``MAX_SPREAD``)."""
        unsteady = sorted(name for name, timing in self.timings.items() if timing.unsteady)
        return {
            "torch_threads": self.threads if self.threads is not None else torch.get_num_threads(),
            "cores": cores(),
            "load_average_1min_before": self.load_before,
            "load_average_1min_after": self.load_after,
            "loaded_limit": LOADED_FRACTION * cores(),
            "settled_seconds": round(self.settled_seconds, 1),
            "loaded": self.loaded,
            "max_spread": MAX_SPREAD,
            "unsteady_timings": unsteady,
            "flagged": self.loaded or bool(unsteady),
        }

    def describe(self) -> str:
        """One line for a report: threads, load before / after and whether the session is flagged."""
        c = self.conditions()
        line = (f"{c['torch_threads']} torch threads on {c['cores']} cores, 1-min load average "
                f"{c['load_average_1min_before']:.2f} before / {c['load_average_1min_after']:.2f} after")
        if c["loaded"]:
            line += f" -- FLAGGED: machine loaded (other processes above {c['loaded_limit']:.1f})"
        if c["unsteady_timings"]:
            line += f" -- FLAGGED: {len(c['unsteady_timings'])} timing(s) with spread above {MAX_SPREAD:.0%}"
        return line
