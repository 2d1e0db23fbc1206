"""The run directory: checkpoint names, listing, the latest checkpoint, where outputs go.

A run (``runs/<run>/<stage dir>/``) holds one directory per checkpoint, named
``seen_{pairs:09d}`` (training) or ``seen_{pairs:09d}_heads_{H:03d}_ffn_{F:05d}`` (pruning),
plus ``metrics.jsonl``. A checkpoint's reshaped model goes to ``<checkpoint>/reshaped/``
(:func:`reshaped_dir`), a model's evaluations to ``<model>/eval/`` (:func:`eval_dir`) and its
ONNX exports to ``<model>/onnx/`` (:func:`onnx_dir`). Recipes ask for the newest checkpoint with
``python -m common.layout latest RUN_DIR`` (by seen pairs, not by name order).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from common.io import replace_dir  # noqa: F401 (checkpoints and reshaped models are replaced with it)

# The training stages, in pipeline order: the stage a checkpoint's trainer_state.json names, the
# method of its results row, the stage dirs of the recipes. Every listing of stages uses these.
PRUNING_STAGES = ("heads", "ffn", "mixed", "l0")
TRAINING_STAGES = ("initial", "recover")
STAGE_ORDER = ("initial",) + PRUNING_STAGES + ("recover",)
PREFIX = "seen_"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
PRUNING_FILE = "pruning.json"
RESHAPED = "reshaped"
EVAL = "eval"
ONNX = "onnx"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
GATES_FILE = "l0_gates.pt"
LORA_FILE = "lora_adapters.safetensors"  # a LoRA stage's trainable tensors, for exact resume (common.models.lora)
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model_int8.onnx"}
OPENVINO = "openvino"  # sentence-transformers' OpenVINO backend reads <model>/openvino/openvino_model.xml
OPENVINO_FILES = {"openvino": "openvino_model.xml", "openvino-int8": "openvino_model_qint8_quantized.xml"}
BACKEND_CHOICE_FILE = "backend_choice.json"  # auto's measured backend per host class (common.serving.choose)


def rng_file(rank: int) -> str:
    """Each DDP rank's RNG state (rank 0 keeps the single-process name)."""
    return "rng.pt" if rank == 0 else f"rng_rank{rank}.pt"
_NAME = re.compile(r"^seen_(\d+)(?:_heads_\d+_ffn_\d+)?$")


def structure_tag(heads: int, ffn: int) -> str:
    """The part of a pruning checkpoint's name that says what is left: heads and FFN neurons."""
    return f"heads_{heads:03d}_ffn_{ffn:05d}"


def checkpoint_name(seen_pairs: int, structure_tag: str | None = None) -> str:
    """``seen_{pairs:09d}`` or ``seen_{pairs:09d}_{structure_tag}``; :func:`seen_pairs_of` parses it."""
    name = f"{PREFIX}{seen_pairs:09d}"
    return f"{name}_{structure_tag}" if structure_tag else name


def reshaped_dir(checkpoint: str | Path) -> Path:
    """Where ``04_reshape.py`` writes a checkpoint's reshaped model by default."""
    return Path(checkpoint, RESHAPED)


def eval_dir(model_dir: str | Path) -> Path:
    """Where ``05_eval_trec.py`` writes a model's run files and per-query measures by default."""
    return Path(model_dir, EVAL)


def onnx_dir(model_dir: str | Path) -> Path:
    """Where ``04_reshape.py --onnx`` writes a model's ONNX files (``common.serving.onnx_export``)."""
    return Path(model_dir, ONNX)


def openvino_dir(model_dir: str | Path) -> Path:
    """Where ``04_reshape.py --openvino`` writes a model's OpenVINO IR (``common.serving.openvino_export``)."""
    return Path(model_dir, OPENVINO)


def export_file(model_dir: str | Path, backend: str) -> Path | None:
    """The exported file a backend runs (ONNX graph or OpenVINO IR); None for the torch backends."""
    if backend in ONNX_FILES:
        return onnx_dir(model_dir) / ONNX_FILES[backend]
    if backend in OPENVINO_FILES:
        return openvino_dir(model_dir) / OPENVINO_FILES[backend]
    return None


def seen_pairs_of(path: str | Path) -> int | None:
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run dir (temporary ``.tmp-*`` dirs excluded), oldest first."""
    found = [p for p in Path(run_dir).iterdir() if p.is_dir() and seen_pairs_of(p) is not None
             and (p / PRUNING_FILE).exists()] if Path(run_dir).is_dir() else []
    return sorted(found, key=lambda p: (seen_pairs_of(p), p.name))


def latest(run_dir: str | Path) -> Path:
    found = checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir}: no checkpoint (seen_*/ with {PRUNING_FILE})")
    return found[-1]


def is_run_artifact(path: str | Path) -> bool:
    """What a training stage writes into its output dir: checkpoints (also half-written
    ``.tmp-`` / replaced ``.old-`` ones) and the metrics log."""
    name = Path(path).name
    for prefix in (".tmp-", ".old-"):
        name = name[len(prefix):] if name.startswith(prefix) else name
    return seen_pairs_of(name) is not None or name == METRICS_FILE


# what a model dir written by slimrank holds (save_model, the tokenizer's files, 04 --onnx)
MODEL_DIR_FILES = frozenset({
    "config.json", WEIGHTS_FILE, PRUNING_FILE, STATE_FILE, "modeling_slimrank.py", "modules.json",
    "sentence_bert_config.json", "1_Pooling", "2_Normalize", ONNX, "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
    "added_tokens.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "chat_template.jinja",
    "config_sentence_transformers.json", "sparse_linear.pt", "colbert_linear.pt", OPENVINO, BACKEND_CHOICE_FILE})
_DENSE_FOLDER = re.compile(r"^\d+_Dense$")  # a bi-encoder's sentence-transformers Dense modules


def is_model_artifact(path: str | Path) -> bool:
    """What ``04_reshape.py`` writes into its output dir (and may replace with --overwrite):
    the files of a saved model, its ONNX export, half-written ``.tmp-`` / ``.old-`` copies.
    Anything else there (evaluations in ``eval/``, a user's notes, an input) is not its own."""
    name = Path(path).name
    for prefix in (".tmp-", ".old-"):
        name = name[len(prefix):] if name.startswith(prefix) else name
    return name in MODEL_DIR_FILES or bool(_DENSE_FOLDER.match(name))


def run_name(checkpoint: str | Path) -> str:
    """The run directory's name with the directory that holds it (``runs/<job>/<run>/seen_.../
    [reshaped]`` -> ``<job>/<run>``, so that stages of different jobs stay apart; a run right
    under ``runs/`` is ``<run>``), else the argument."""
    path = Path(checkpoint)
    for part in (path, *path.parents):
        if seen_pairs_of(part) is not None:
            run, job = part.parent.name, part.parent.parent.name
            return run if job in ("", ".", "..", "runs") else f"{job}/{run}"
    return str(checkpoint)


def stage_state(run_dir: str | Path, end: int) -> str:
    """Where a stage writing its checkpoints to ``run_dir`` stands, for a run that goes on: ``done``
    when its last checkpoint (``end`` pairs seen) is there, else the latest checkpoint (resume from
    it), else ``start``. A checkpoint past ``end`` is another stage's: an error."""
    found = checkpoints(run_dir)
    if any(seen_pairs_of(p) == end for p in found):
        return "done"
    if found and seen_pairs_of(found[-1]) > end:
        raise ValueError(f"{run_dir}: its latest checkpoint {found[-1].name} is past the stage's end "
                         f"({end} pairs seen): another stage's run dir?")
    return str(found[-1]) if found else "start"


USAGE = "usage: python -m common.layout latest RUN_DIR | state RUN_DIR END_SEEN_PAIRS"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) == 2 and argv[0] == "latest":
            print(latest(argv[1]))
        elif len(argv) == 3 and argv[0] == "state" and argv[2].isdigit():
            print(stage_state(argv[1], int(argv[2])))
        else:
            sys.exit(USAGE)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
