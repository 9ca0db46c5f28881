"""How the model card writes numbers: fixed decimals, "n/a", mean ± sd, intervals and small counts in words."""
from __future__ import annotations

COUNT_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def fixed(x, digits: int = 4) -> str:
    """x to `digits` decimals; "n/a" for None (not scored)."""
    return "n/a" if x is None else f"{x:.{digits}f}"


def fixed_or_na(x, digits: int = 4) -> str:
    """As fixed, and "n/a" for NaN too (an AUC of one class only)."""
    return fixed(x if x == x else None, digits)


def mean_sd(block: dict, key: str) -> str:
    """"mean ± sd" of block["mean_sd"][key], 4 decimals."""
    s = block["mean_sd"][key]
    return f"{s['mean']:.4f} ± {s['sd']:.4f}"


def interval(x) -> str:
    """A 95% interval (low, high) as [low, high], 3 decimals."""
    return f"[{x[0]:.3f}, {x[1]:.3f}]"


def count_word(n: int) -> str:
    """A small count in words ("four"), larger ones in digits."""
    return COUNT_WORDS[n] if 0 <= n < len(COUNT_WORDS) else str(n)
