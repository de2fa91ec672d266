"""Declared options of the source-free methods: name -> type and bounds (``OPTIONS`` on each class).

``check_options`` validates the ``options`` of an adaptation request against them before a job is
queued, so a bad value is a 422 naming the option instead of a job that fails later, and numbers
stay in ranges the training loop can afford. Pure; no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


class OptionError(ValueError):
    """A bad option: ``name`` is the option, the message says what is allowed."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"option {name!r}: {message}")
        self.name = name


@dataclass(frozen=True)
class Option:
    kind: type  # bool, int, float or str
    low: float | None = None  # inclusive bounds of numbers
    high: float | None = None
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind is bool:
            return "true or false"
        what = "an integer" if self.kind is int else "a number"
        return f"{what} in [{self.low:g}, {self.high:g}]"

    def check(self, name: str, value: object) -> object:
        got = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        if self.kind is bool:
            if not isinstance(value, bool):
                raise OptionError(name, f"must be {self.describe()}, got {got}")
            return value
        if self.kind is str:
            if value not in self.choices:
                raise OptionError(name, f"must be {self.describe()}, got {got}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float) or (self.kind is int and
                                                                             not isinstance(value, int)):
            raise OptionError(name, f"must be {self.describe()}, got {got}")
        if not math.isfinite(value) or not (self.low is None or value >= self.low) \
                or not (self.high is None or value <= self.high):
            raise OptionError(name, f"must be {self.describe()}, got {got}")
        return value


def Float(low: float, high: float) -> Option:  # noqa: N802 - reads like a type in the declarations
    return Option(float, low, high)


def Int(low: int, high: int) -> Option:  # noqa: N802
    return Option(int, low, high)


def Bool() -> Option:  # noqa: N802
    return Option(bool)


def Choice(*values: str) -> Option:  # noqa: N802
    return Option(str, choices=tuple(values))


PARAMS = Choice("all", "backbone", "bn", "heads")  # adaptation.methods.bn.PARAM_POLICIES
SAFEGUARDS = {  # adaptation.ema.SafeguardConfig, shared by the self-supervised methods
    "ema_momentum": Float(0.0, 0.9999), "anchor_weight": Float(0.0, 100.0), "anchor_confidence": Float(0.0, 1.0),
    "restore_p": Float(0.0, 1.0),
}


def check_options(method: str, declared: Mapping[str, Option], options: Mapping[str, object]) -> dict[str, object]:
    """``options`` checked against ``declared``; raises ``OptionError`` for an unknown name or a bad value."""
    for name in options:
        if name not in declared:
            allowed = ", ".join(sorted(declared)) or "none"
            raise OptionError(name, f"is not an option of {method} (its options: {allowed})")
    return {name: declared[name].check(name, value) for name, value in options.items()}
