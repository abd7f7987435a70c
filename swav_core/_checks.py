"""Argument checks shared by the modules: a clear ValueError naming the argument and the value."""
import operator


def _int_at_least(name: str, value, low: int) -> int:
    """``value`` as an int ≥ ``low`` (a Python or NumPy integer, not a bool), else a ValueError."""
    is_int = not isinstance(value, bool) and hasattr(type(value), "__index__")
    if not is_int or operator.index(value) < low:
        kind = {0: "a non-negative int", 1: "a positive int"}.get(low, f"an int >= {low}")
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return operator.index(value)


def _flag(name: str, value) -> bool:
    """``value`` as a bool (True, False, 1 or 0), else a ValueError: a string like "no" is not False."""
    if not isinstance(value, (bool, int)) or value not in (0, 1):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def _positive_int(name: str, value) -> int:
    return _int_at_least(name, value, 1)
