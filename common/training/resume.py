"""What a stage checks before it starts or resumes: the trainer state of its source checkpoint,
start vs resume said (never guessed), the arguments a resume must keep, no evaluation queries
among the training queries."""
from __future__ import annotations

import json
import platform
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from common.data.formats import DataError, open_text, read_candidates
from common.layout import METRICS_FILE, OPTIMIZER_FILE, STATE_FILE, WEIGHTS_FILE, checkpoints
from common.models.loading import PACKAGED_MODELS
from common.kinds.loading import LoadedModel, load_model
from common.training.args import RESUME_MAY_CHANGE, TrainArgs


def library_versions() -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def read_trainer_state(directory: str | Path) -> dict | None:
    path = Path(directory, STATE_FILE)
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(state, dict) or not {"stage", "seen_pairs", "step", "args"} <= set(state):
        raise DataError(f"{path}: not a trainer state (needs stage, seen_pairs, step, args)")
    return state


def read_source_state(directory: str | Path) -> dict | None:
    """The trainer state of a start/resume checkpoint: None for a plain model dir or a packaged
    tag (``all-MiniLM-L6-v2``); an error for a missing directory, and for a training checkpoint
    (it has optimizer.pt) whose trainer_state.json is gone."""
    if str(directory) in PACKAGED_MODELS:
        return None
    if not Path(directory).exists():
        raise DataError(f"--checkpoint_dir {directory}: no such directory "
                        f"(nor a packaged model tag: {sorted(PACKAGED_MODELS)})")
    state = read_trainer_state(directory)
    if state is None and Path(directory, OPTIMIZER_FILE).exists():
        raise DataError(f"{directory}: {STATE_FILE} is missing: a training checkpoint cannot be "
                        "resumed or continued without it")
    return state


def check_no_eval_overlap(triples_file: str, candidates_file: str) -> None:
    """Training queries (the first field of every line) must not be evaluation queries."""
    evaluated = set(read_candidates(candidates_file)["query"].astype(str).str.strip())
    with open_text(triples_file) as f:
        shared = {q for q in (line.split("\t", 1)[0].strip() for line in f) if q in evaluated}
    if shared:
        raise DataError(f"{triples_file}: {len(shared)} training queries are queries of "
                        f"{candidates_file} (e.g. {sorted(shared)[0]!r}); monitor on held-out "
                        "queries, or pass --allow_eval_overlap to train anyway")


def check_start_or_resume(args: "TrainArgs", stage: str) -> None:
    """Start vs resume is said, never guessed: ``--resume`` needs a checkpoint of this stage,
    and a checkpoint of this stage is not silently resumed (nor restarted) without it."""
    source = read_source_state(args.checkpoint_dir) if args.checkpoint_dir else None
    source_stage = (source or {}).get("stage")
    if args.resume and source_stage != stage:
        what = f"a checkpoint of stage {source_stage!r}" if source_stage else "not a training checkpoint"
        raise DataError(f"--resume: --checkpoint_dir {args.checkpoint_dir} is {what}, not of this "
                        f"stage ({stage!r}); drop --resume to start this stage from it")
    if not args.resume and source_stage == stage:
        raise DataError(f"--checkpoint_dir {args.checkpoint_dir} is a checkpoint of this stage "
                        f"({stage!r}): pass --resume to resume it")


def check_resume_args(args: "TrainArgs", state: dict, checkpoint_dir: str,
                      stage_args: dict | None = None) -> None:
    """Every argument that shapes the stage equals the checkpoint's: the training arguments
    (but ``RESUME_MAY_CHANGE``) and the stage's own (``Callback.stage_args``: pruning targets,
    gate settings), which the checkpoint keeps under ``stage_args``."""
    if not Path(checkpoint_dir, OPTIMIZER_FILE).exists():
        raise DataError(f"{checkpoint_dir} has no optimizer.pt (a reshaped model?): it cannot be "
                        "resumed; start a new stage from it instead")
    saved = state.get("args", {})
    changed = [f"--{k} {saved[k]!r} -> {v!r}" for k, v in asdict(args).items()
               if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != v]
    saved_stage = state.get("stage_args")
    if stage_args and saved_stage is None:
        raise DataError(f"{checkpoint_dir}/{STATE_FILE} does not record this stage's arguments "
                        f"({', '.join('--' + k for k in stage_args)}): they cannot be checked, so it "
                        "cannot be resumed; start a new stage from it instead")
    changed += [f"--{k} {saved_stage.get(k)!r} -> {v!r}" for k, v in (stage_args or {}).items()
                if saved_stage.get(k) != v]
    if changed:
        raise ValueError(f"resuming {checkpoint_dir} with changed arguments: {'; '.join(changed)} "
                         "(these must match the checkpoint's trainer_state.json)")


def lora_base(args: "TrainArgs") -> dict:
    """What a fresh LoRA stage starts from, as its checkpoints record it (``lora_base`` in
    trainer_state.json): the model and the loader arguments that shape its weights. A local
    directory is named by its absolute path."""
    name = args.checkpoint_dir or args.model_tag
    fresh = not args.checkpoint_dir
    return {"model": str(Path(name).resolve()) if Path(name).is_dir() else name, "kind": args.model_kind,
            "pooling": args.pooling, "head": args.head if fresh else None, "heads": args.heads if fresh else None}


def restore_lora_base(loaded: LoadedModel, base: dict | None, checkpoint: str) -> None:
    """Give the model of a LoRA checkpoint (its merged weights) the frozen weights the running
    stage held: its start model's (``base``), the units pruned so far zeroed
    (``common.models.lora``: the adapters are loaded after they are injected)."""
    from common.models.structure import zero_dead_weights

    if not base:
        raise DataError(f"{checkpoint}/{STATE_FILE}: a LoRA checkpoint that does not name the stage's start "
                        "model (written before LoRA stages could resume): start a new stage from it instead")
    where = f"{checkpoint}/{STATE_FILE}: lora_base {base['model']!r}"
    try:
        start = load_model(base["model"], "cpu", kind=base.get("kind"), pooling=base.get("pooling"),
                           head=base.get("head"), heads=base.get("heads"))
    except (ValueError, FileNotFoundError) as err:
        raise DataError(f"{where}: the stage's start model cannot be loaded ({err})") from None
    try:
        loaded.model.load_state_dict(start.model.state_dict(), strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise DataError(f"{where} is not the model this stage started from ({first})") from None
    zero_dead_weights(loaded.model, loaded.state)


def check_lora_resumed(model, checkpoint: str, base: dict) -> None:
    """Start weights + adapters must give the checkpoint's merged weights: else its start
    model has changed since (``common.models.lora.merged_mismatch``)."""
    from common.models.lora import merged_mismatch

    wrong = merged_mismatch(model, Path(checkpoint, WEIGHTS_FILE))
    if wrong:
        raise DataError(f"{checkpoint}: its start model {base['model']!r} plus its LoRA adapters do not give its "
                        f"weights ({wrong!r} differs): the start model has changed since the stage began, so "
                        "the stage cannot be resumed exactly; start a new stage from the checkpoint instead")


def check_teacher_rows(scores_file: str, rows: int, triples_file: str) -> None:
    """Row i of the teacher scores scores line i of the training file: the counts must match
    (checked before training, not when the stream runs out of scores mid-stage)."""
    with open_text(triples_file) as f:
        lines = sum(1 for line in f if line.strip())
    if rows != lines:
        raise DataError(f"--distill_scores {scores_file} has {rows} rows but --train_triples_file "
                        f"{triples_file} has {lines} lines: row i scores line i, so they must match")


def read_metrics(path: Path) -> list[tuple[str, dict]]:
    """``(line, record)`` of each line of ``metrics.jsonl``. A truncated last line (a run killed
    while writing it) is dropped with a note; a bad line before it is an error naming the line."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "seen_pairs" not in record:
                raise ValueError("no seen_pairs")
        except ValueError as err:
            if number == len(lines):
                tqdm.write(f"note: {path} line {number}: truncated (a killed run's last line), dropped")
                continue
            raise DataError(f"{path} line {number}: not a metrics record ({err})") from None
        out.append((line, record))
    return out


def training_throughput(run_dir: str | Path) -> dict:
    """Pairs/s of one stage's run dir from its metrics.jsonl: (pairs between the first and the
    last train event) / (their ``elapsed_s`` apart, less the checkpoint writes in between); the
    first step (kernel selection, allocator warm-up) is left out. With the stage's precision,
    device, batch size and max_length (trainer_state.json of its last checkpoint)."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.exists():
        raise DataError(f"{path}: missing (did the stage run?)")
    events = [record for _line, record in read_metrics(path)]
    train = [e for e in events if e["event"] == "train" and "elapsed_s" in e]
    if len(train) < 2:
        raise DataError(f"{path}: {len(train)} train events with elapsed_s; pairs/s needs 2 or more")
    first, last = train[0], train[-1]
    saving = sum(e.get("seconds", 0.0) for e in events if e["event"] == "checkpoint"
                 and first["stage_pairs"] <= e["stage_pairs"] < last["stage_pairs"])
    seconds = last["elapsed_s"] - first["elapsed_s"] - saving
    pairs = last["stage_pairs"] - first["stage_pairs"]
    saved = checkpoints(run_dir)
    state = json.loads((saved[-1] / STATE_FILE).read_text()) if saved else {}
    args = state.get("args", {})
    return {"stage": f"{first['stage']} ({run_dir.name})", "precision": args.get("precision", "?"),
            "device": state.get("distributed", {}).get("device", "?"), "batch": args.get("batch_size"),
            "max_length": args.get("max_length"), "pairs timed": pairs,
            "pairs/s": round(pairs / seconds, 1) if seconds > 0 else float("nan")}
