"""Arguments: argparse types, the range check, and :func:`arg`, the one declaration of a field of
an argument dataclass (help, group, range, choices, resume rule).

Kept apart from ``common.cli`` (which runs the trainer) so that the argument dataclasses of
``common.training.loop`` and ``common.pruning.cycles`` can use them without an import cycle.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, field, fields, is_dataclass


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (the flag is named in argparse's error line)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1] (weights, fractions)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {text}")
    return value


def check_ranges(args, ranges: dict[str, tuple]) -> None:
    """Numeric arguments within their ranges: ``{field: (low, high, low_open, high_open)}``,
    ``None`` for an unbounded side; an unset (None) optional argument is not checked. Raises
    ``ValueError`` naming the flag. Every float field of a dataclass ``args`` must be finite
    (NaN or inf is refused whether or not the field has a range: new arguments inherit it)."""
    if is_dataclass(args):
        for f in fields(args):
            value = getattr(args, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{f.name} must be a finite number, got {value}")
    for name, (low, high, low_open, high_open) in ranges.items():
        value = getattr(args, name)
        if value is None:
            continue
        if not math.isfinite(value):  # NaN, inf
            raise ValueError(f"--{name} must be a finite number, got {value}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
            raise ValueError(f"--{name} must be {' and '.join(x for x in (lo, hi) if x)}, got {value}")


# -- one declaration per argument -----------------------------------------------------------------
# An argument dataclass declares each field once with :func:`arg`: its default, help, --help group,
# numeric range, choices and whether a resumed stage may change it. The argument groups, the range
# and choice checks and the resume rule are read from these declarations (:func:`declared`), never
# listed a second time. The extra keys are stripped before argparse sees the field (common.cli).
DECLARATION_KEYS = ("group", "bounds", "resume_may_change")


def arg(default=MISSING, *, help: str | None = None, group: str | None = None,
        bounds: tuple | None = None, choices: tuple | None = None, resume_may_change: bool = False,
        default_factory=MISSING):
    """A dataclass field with its whole declaration. ``bounds``: ``(low, high, low_open,
    high_open)`` (``None`` for an unbounded side; see :func:`check_ranges`); ``choices``: the
    allowed values (argparse refuses others; :func:`check_declared` too, for objects built in
    code); ``resume_may_change``: a resumed stage may give another value (every other argument
    must equal the checkpoint's)."""
    metadata = {"group": group, "bounds": bounds, "resume_may_change": resume_may_change}
    if help is not None:
        metadata["help"] = help
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(default=default, default_factory=default_factory, metadata=metadata)


def declared(cls, key: str) -> dict:
    """``{field name: its declared value of key}`` for the fields that declare one, in order."""
    return {f.name: f.metadata[key] for f in fields(cls) if f.metadata.get(key) not in (None, False)}


def argument_groups(cls) -> dict[str, tuple[str, ...]]:
    """``{group: field names}`` in declaration order (the --help groups)."""
    groups: dict[str, list[str]] = {}
    for name, group in declared(cls, "group").items():
        groups.setdefault(group, []).append(name)
    return {group: tuple(names) for group, names in groups.items()}


def check_declared(args) -> None:
    """The declared ranges and choices of ``args`` (a dataclass instance); ``ValueError`` naming
    the flag. Unset (None) optional arguments are not checked."""
    check_ranges(args, declared(type(args), "bounds"))
    for name, choices in declared(type(args), "choices").items():
        value = getattr(args, name)
        if value is not None and value not in choices:
            raise ValueError(f"--{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
def repeated_option(argv: list[str]) -> str | None:
    """The first ``--flag`` given twice in ``argv`` (``--flag value``, ``--flag=value``, or its
    ``--flag-name`` spelling), else None: a second value would silently replace the first."""
    seen = set()
    for item in argv:
        if item == "--":
            break
        if item.startswith("--"):
            flag = item.split("=", 1)[0]
            name = "--" + flag[2:].replace("-", "_")  # --gate-init is --gate_init
            if name in seen:
                return flag
            seen.add(name)
    return None


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, refusing an option given twice (argparse keeps the last)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    flag = repeated_option(argv)
    if flag:
        parser.error(f"{flag} is given twice: give each option once")
    return parser.parse_args(argv)
