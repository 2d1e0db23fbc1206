"""A study's settings for a shell recipe: one TOML file per registered run
(``recipes/config/<study>/<run>.toml``), read against the names and defaults the recipe declares,
printed as shell assignments (``NAME='value'``, upper case) for the recipe to ``eval``.

    SETTINGS=$($PY -m common.settings FILE kind=bi pairs=12288 ...) && eval "$SETTINGS"

A setting the recipe does not declare, a value that is a table or a list, or a file that is not
TOML is one ``error:`` line naming the file (and the setting): a typo never falls back to a default.
"""
from __future__ import annotations

import shlex
import sys
import tomllib
from pathlib import Path


def recipe_settings(path: str, defaults: dict[str, str]) -> dict[str, str]:
    """``defaults`` overridden by the file's settings, every value as the text the shell sees
    (booleans as 1 / 0)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"{path}: {err}") from None
    settings = dict(defaults)
    for name, value in data.items():
        if name not in defaults:
            raise ValueError(f"{path}: unknown setting {name!r} (this recipe's: {', '.join(defaults)})")
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"{path}: setting {name!r} must be a string or a number, got {value!r}")
        settings[name] = str(value)
    return settings


def main(argv: list[str]) -> None:
    if len(argv) < 1 or any("=" not in a for a in argv[1:]):
        sys.exit("usage: python -m common.settings FILE name=default ...")
    defaults = dict(a.split("=", 1) for a in argv[1:])
    try:
        settings = recipe_settings(argv[0], defaults)
    except ValueError as err:
        sys.exit(f"error: {' '.join(str(err).split())}")
    for name, value in settings.items():
        print(f"{name.upper()}={shlex.quote(value)}")


if __name__ == "__main__":
    main(sys.argv[1:])
