"""Argument checks shared by the library: each error names the bad value."""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch


def check_int(name: str, value, *, minimum: int = 1) -> int:
    """Return ``value`` as an int >= ``minimum``; bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")
    return int(value)


def check_positive_float(name: str, value) -> float:
    """Return ``value`` as a finite float > 0."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {name}={value}")
    return float(value)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")
    return value


def check_float_tensor(name: str, tensor, *, dims: tuple[int, ...]) -> torch.Tensor:
    """A floating tensor with one of ``dims`` dimensions and only finite entries."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {tensor.dtype}")
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        kind = "NaN" if torch.isnan(tensor[tuple(bad)]) else "Inf"
        raise ValueError(f"{name} contains {kind} (first at index {tuple(bad)}, shape {tuple(tensor.shape)})")
    return tensor


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32: finite differences are never done in bf16/fp16."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
