"""Argument checks shared by the modules: a clear ValueError naming the argument and the value."""
import math
import numbers
import operator
from typing import Optional, Tuple

import torch


def _as_int(value) -> Optional[int]:
    """``value`` as an int when it is an integer (int, NumPy integer, 0-dim integer tensor) other than a
    bool, else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _int_at_least(name: str, value, low: int) -> int:
    """``value`` as an int ≥ ``low`` (see :func:`_as_int`), else a ValueError naming it."""
    number = _as_int(value)
    if number is None or number < low:
        kind = {0: "a non-negative int", 1: "a positive int"}.get(low, f"an int >= {low}")
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return number


def _flag(name: str, value) -> bool:
    """``value`` as a bool: True / False, 1 / 0 (also NumPy's, or a 0-dim tensor), else a ValueError —
    a string such as "no" is truthy, not False."""
    kind = type(value)
    if isinstance(value, torch.Tensor):
        number = value.item() if value.ndim == 0 and not (value.is_floating_point() or value.is_complex()) else None
    elif isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")):
        number = bool(value)  # NumPy 2's bool has no __index__
    else:
        number = _as_int(value)
    if number is None or number not in (0, 1):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return bool(number)


def _positive_int(name: str, value) -> int:
    return _int_at_least(name, value, 1)


def _parse_size(size) -> Tuple[int, Optional[int]]:
    """``size`` → (length, D or None), with a ValueError for anything else."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if is_int(size):
        if size < 0:
            raise ValueError(f"size must be a non-negative int or (length, dim), got {size!r}")
        return size, None
    if isinstance(size, (tuple, list, torch.Size)) and len(size) == 2 and all(map(is_int, size)):
        length, dim = size
        if length >= 0 and dim > 0:
            return length, dim
    raise ValueError(
        f"size must be a non-negative int (length) or a pair (length >= 0, dim > 0) of ints, got {size!r}"
    )


def _counter_error(prefix: str, name: str, value, top: int, length: int) -> Optional[str]:
    """Why ``value`` is not a valid queue counter (a 0-dim integer tensor in [0, top]), or None."""
    is_tensor = isinstance(value, torch.Tensor)
    integer = is_tensor and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    if not (integer and value.ndim == 0):
        got = f"shape {tuple(value.shape)}, dtype {value.dtype}" if is_tensor else type(value).__name__
        return f"{prefix}{name} must be a 0-dim integer tensor, got {value!r} ({got})"
    if not 0 <= int(value) <= top:
        return f"{prefix}{name}={int(value)} is out of range: expected 0..{top} (queue length {length})"
    return None


def _positive_number(name: str, value) -> float:
    """``value`` as a float > 0 with a finite inverse, else a ValueError naming it. Only comparisons,
    so that ``torch.compile`` traces it on a symbolic float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
        0.0 < value < math.inf and 1.0 / value < math.inf
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)

