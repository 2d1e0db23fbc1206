"""The one training loop: ``02`` and every ``03*`` run it; pruning is a callback.

Units are pairs everywhere: a triple (query, positive, negative) gives two pairs, and
``--batch_size``, ``--num_training_samples``, ``--num_checkpoint_samples`` and ``seen_pairs``
count pairs. Checkpoints (``output_dir/seen_{pairs:09d}[_heads_H_ffn_F]/``) hold the model
(safetensors, base config, tokenizer, pruning.json), ``optimizer.pt``, ``scheduler.pt``,
``rng.pt`` and ``trainer_state.json``; they are written to a temporary directory and renamed.
Resuming from one continues with the next unseen triple, the same LR and the same RNG
stream, so N pairs + resume + N pairs equals 2N pairs straight.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Optional

import torch
import transformers
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from common.training.argtypes import check_ranges
from common.data.formats import (DataError, TriplesStream, candidates_to_run, open_text, read_candidates,
                         read_qrels, read_teacher_scores)
from common.hardware import cpu_has_native_bf16
from common.evaluation.trec import evaluate_run
from common.training.hidden import LayerOutputs, hidden_mse
from common.io import atomic_write_text
from common.training.losses import Loss, get_loss, loss_class, score_distillation_losses
from common.models.kinds import KINDS
from common.models.loading import PACKAGED_MODELS, load_model, pick_device, save_model
from common.models import m3
from common.serving.rank import (QUERY_ENCODER_FIELD, Ranker, backend_for_precision, check_query_encoder,
                         query_encoder_of)
from common.layout import (METRICS_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, STATE_FILE, checkpoint_name, is_run_artifact,
                           replace_dir, rng_file)
from common.models.segment import HEADS, is_segment
from common.models.structure import zero_dead_weights

log = logging.getLogger("slimrank")
DEFAULT_DISTILL_LOSS = "margin_mse"


# TrainArgs in the groups --help shows (every field in exactly one: a test checks); PruneArgs
# is the group "pruning"
ARGUMENT_GROUPS = {
    "model": ("model_tag", "checkpoint_dir", "resume", "model_kind", "head", "pooling", "heads", "query_encoder"),
    "data": ("train_triples_file", "group_size", "max_length", "seen_pairs", "allow_eval_overlap"),
    "optimisation": ("num_training_samples", "learning_rate", "gate_learning_rate", "batch_size",
                     "warmup_fraction", "weight_decay", "max_grad_norm", "seed", "temperature",
                     "contrastive_weight"),
    "distillation": ("distill_from", "distill_target", "distill_weight", "distill_scores",
                     "distill_scale", "distill_loss", "distill_hidden"),
    "evaluation": ("eval_candidates_file", "eval_qrels_file", "eval_batch_size", "eval_max_queries"),
    "run": ("output_dir", "num_checkpoint_samples", "overwrite", "device", "precision", "threads",
            "log_every"),
}


@dataclass
class TrainArgs:
    """Arguments shared by 02_train_initial.py and the 03* pruning scripts."""

    train_triples_file: str = field(metadata={"help": "query<TAB>positive<TAB>negative TSV"})
    output_dir: str = field(metadata={"help": "checkpoints go to output_dir/seen_.../"})
    num_training_samples: int = field(metadata={"help": "pairs to train in this stage"})
    num_checkpoint_samples: int = field(default=0, metadata={
        "help": "checkpoint every N pairs (0: only at the end); a multiple of batch_size"})
    model_tag: Optional[str] = field(default=None, metadata={
        "help": "start model: local dir, hub name or packaged tag (all-MiniLM-L6-v2)"})
    checkpoint_dir: Optional[str] = field(default=None, metadata={
        "help": "the model to start this stage from (a checkpoint of an earlier stage, a model dir "
                "or tag), or with --resume a checkpoint of this stage to resume"})
    resume: bool = field(default=False, metadata={
        "help": "resume --checkpoint_dir, a checkpoint of this stage (exactly: optimizer, "
                "scheduler, RNG and data position); without it a stage always starts"})
    eval_candidates_file: Optional[str] = field(default=None, metadata={
        "help": "candidates parquet re-ranked at every checkpoint (NDCG@10 to metrics.jsonl)"})
    eval_qrels_file: Optional[str] = field(default=None, metadata={"help": "qrels of the eval topics"})
    learning_rate: float = field(default=7e-6, metadata={"help": "peak LR"})
    batch_size: int = field(default=32, metadata={"help": "pairs per optimizer step (even)"})
    warmup_fraction: float = field(default=0.1, metadata={"help": "linear warmup share (02)"})
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_length: int = field(default=256, metadata={"help": "tokens per pair; the passage is truncated"})
    seed: int = 42
    seen_pairs: Optional[int] = field(default=None, metadata={
        "help": "pairs of the triples stream already used (default: from the checkpoint)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1 ..."})
    precision: str = field(default="fp32", metadata={"help": "fp32, bf16 (autocast) or fp16 (CUDA)"})
    threads: Optional[int] = field(default=None, metadata={"help": "torch.set_num_threads"})
    eval_batch_size: int = 64
    eval_max_queries: Optional[int] = field(default=None, metadata={
        "help": "evaluate checkpoints on the first N eval queries only (cheaper monitoring; "
                "05_eval_trec.py reports the full set)"})
    log_every: int = field(default=1, metadata={"help": "log to metrics.jsonl every N steps"})
    distill_from: Optional[str] = field(default=None, metadata={
        "help": "teacher checkpoint: adds margin-MSE on (pos - neg) score margins"})
    distill_weight: float = 1.0
    distill_hidden: float = field(default=0.0, metadata={
        "help": "with --distill_from: weight of a layer-wise MSE between the student's and the "
                "teacher's hidden states (layer i vs layer i, padding excluded; common.training.hidden)"})
    distill_scores: Optional[str] = field(default=None, metadata={
        "help": "teacher scores parquet (teacher_pos, teacher_neg; row i = triple i): train on "
                "margin-MSE to the teacher's margins instead of cross-entropy on labels"})
    distill_scale: float = field(default=1.0, metadata={"help": "teacher scores are multiplied by this"})
    distill_loss: str = field(default="margin_mse", metadata={
        "help": "with --distill_scores: 'margin_mse' (pairs) or 'kl' (listwise: KL from the "
                "softmax of the scaled teacher scores over each row's passages to the student's), "
                "or any loss registered in common.training.losses that takes scores and teacher scores"})
    group_size: int = field(default=2, metadata={
        "help": "passages per training row: 2 = (query, pos, neg) triples; n > 2 = listwise "
                "groups (query + n passages; --distill_scores with teacher_0..teacher_{n-1}, "
                "--distill_loss kl); --batch_size counts (query, passage) pairs either way"})
    model_kind: Optional[str] = field(default=None, metadata={
        "help": "cross (default) or bi, for a fresh start; checkpoints know their kind"})
    head: Optional[str] = field(default=None, metadata={
        "help": "cross-encoder head for a fresh start: classifier (monoBERT, 2 labels; default) or "
                "segment_cosine (starts as the model's own bi-encoder: common.models.segment)"})
    gate_learning_rate: Optional[float] = field(default=None, metadata={
        "help": "segment_cosine head: peak LR of the cross-segment attention gates (default: "
                "--learning_rate; they start shut at 0 and a gate of 1 is full attention)"})
    pooling: Optional[str] = field(default=None, metadata={
        "help": "bi-encoder pooling, mean or cls (default: the model's sentence-transformers config)"})
    heads: Optional[str] = field(default=None, metadata={
        "help": "bi-encoder heads for a fresh start: dense (default) or dense,sparse,colbert (BGE-M3: "
                "the sparse and ColBERT heads from the model dir's sparse_linear.pt / colbert_linear.pt, "
                "else new; unified in-batch training with self-distillation, common.models.m3); "
                "checkpoints know theirs"})
    query_encoder: Optional[str] = field(default=None, metadata={
        "help": "bi-encoder: a frozen encoder (tag, hub name or path, e.g. the unpruned "
                "all-MiniLM-L6-v2) embeds the queries and the model only the passages; written "
                "into the model's config, so later stages, 05 and common.serving.rank use it (a checkpoint "
                "that names one keeps it)"})
    temperature: float = field(default=0.02, metadata={
        "help": "bi-encoder contrastive loss temperature (in-batch negatives)"})
    contrastive_weight: float = field(default=1.0, metadata={
        "help": "bi-encoder: weight of the in-batch contrastive loss (0: distillation only)"})
    distill_target: str = field(default="scores", metadata={
        "help": "with --distill_from: 'scores' (margin-MSE) or, for bi-encoders, 'embeddings' (MSE)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output_dir"})
    allow_eval_overlap: bool = field(default=False, metadata={
        "help": "train even though some training queries are queries of --eval_candidates_file "
                "(refused by default: monitoring on training queries is no held-out measure)"})

    RANGES = {  # (low, high, low_open, high_open): common.cli.check_ranges
        "num_training_samples": (0, None, True, False), "num_checkpoint_samples": (0, None, False, False),
        "learning_rate": (0, None, True, False), "gate_learning_rate": (0, None, True, False),
        "batch_size": (0, None, True, False), "warmup_fraction": (0, 1, False, True),
        "weight_decay": (0, None, False, False), "max_grad_norm": (0, None, True, False),
        "max_length": (4, None, False, False), "seen_pairs": (0, None, False, False),
        "threads": (1, None, False, False), "eval_batch_size": (1, None, False, False),
        "eval_max_queries": (1, None, False, False), "log_every": (1, None, False, False),
        "distill_weight": (0, None, False, False), "distill_scale": (0, None, True, False),
        "distill_hidden": (0, None, False, False),
        "temperature": (0, None, True, False), "contrastive_weight": (0, None, False, False),
    }

    def validate(self) -> None:
        check_ranges(self, self.RANGES)
        if self.group_size < 2:
            raise ValueError(f"--group_size must be >= 2, got {self.group_size}")
        if self.batch_size < self.group_size or self.batch_size % self.group_size:
            raise ValueError(f"--batch_size ({self.batch_size} pairs) must be a multiple of "
                             f"--group_size ({self.group_size})")
        if self.distill_loss not in score_distillation_losses():
            raise ValueError(f"--distill_loss must be one of {', '.join(score_distillation_losses())}, "
                             f"got {self.distill_loss!r}")
        if self.distill_loss != DEFAULT_DISTILL_LOSS and not self.distill_scores:
            raise ValueError(f"--distill_loss {self.distill_loss} needs --distill_scores")
        if self.group_size > 2 and not (self.distill_scores and loss_class(self.distill_loss).listwise):
            raise ValueError("--group_size > 2 trains listwise: give --distill_scores and a listwise "
                             "--distill_loss (kl)")
        if self.num_training_samples % self.batch_size:
            raise ValueError(f"--num_training_samples ({self.num_training_samples}) must be a "
                             f"multiple of --batch_size ({self.batch_size})")
        if self.num_checkpoint_samples % self.batch_size:
            raise ValueError(f"--num_checkpoint_samples ({self.num_checkpoint_samples}) must be "
                             f"a multiple of --batch_size ({self.batch_size})")
        if self.model_tag is None and self.checkpoint_dir is None:
            raise ValueError("give --model_tag (fresh start) or --checkpoint_dir")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"--precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.distill_hidden and not self.distill_from:
            raise ValueError("--distill_hidden distils the hidden states of --distill_from: give it")
        if self.query_encoder is not None and not self.query_encoder.strip():
            raise ValueError("--query_encoder must name a model (tag, hub name or path)")
        if self.query_encoder and self.distill_hidden:
            raise ValueError("--distill_hidden compares the student's layers on queries and passages; "
                             "with --query_encoder the student sees passages only: drop one of them")
        if self.heads is not None:
            m3.parse_heads(self.heads)
        if self.model_kind not in (None, *KINDS):
            raise ValueError(f"--model_kind must be cross or bi, got {self.model_kind!r}")
        if self.head not in (None, *HEADS):
            raise ValueError(f"--head must be one of {HEADS}, got {self.head!r}")
        if self.distill_target not in ("scores", "embeddings"):
            raise ValueError(f"--distill_target must be scores or embeddings, got {self.distill_target!r}")
        if bool(self.eval_candidates_file) != bool(self.eval_qrels_file):
            raise ValueError("--eval_candidates_file and --eval_qrels_file go together")


# -- torch.distributed: one process per device under `torchrun`; nothing changes without it -----
def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """Start the process group when launched by torchrun: NCCL on CUDA, gloo on CPU."""
    rank, world, local = distributed_env()
    device = pick_device(device_name)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a list of floats over ranks (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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


# TrainArgs fields a resumed stage may change; every other one must equal the checkpoint's
RESUME_MAY_CHANGE = frozenset({
    "checkpoint_dir", "num_checkpoint_samples", "eval_candidates_file", "eval_qrels_file",
    "eval_batch_size", "eval_max_queries", "threads", "device", "log_every", "overwrite",
    "output_dir", "model_tag", "seen_pairs", "allow_eval_overlap", "head", "model_kind", "pooling",
    "heads", "resume"})  # the checkpoint knows these


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


def check_resume_args(args: "TrainArgs", state: dict, checkpoint_dir: str) -> None:
    if not Path(checkpoint_dir, OPTIMIZER_FILE).exists():
        raise DataError(f"{checkpoint_dir} has no optimizer.pt (a reshaped model?): it cannot be "
                        "resumed; start a new stage from it instead")
    saved = state.get("args", {})
    changed = [f"--{k} {saved[k]!r} -> {v!r}" for k, v in asdict(args).items()
               if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != v]
    if changed:
        raise ValueError(f"resuming {checkpoint_dir} with changed arguments: {'; '.join(changed)} "
                         "(these must match the checkpoint's trainer_state.json)")


def apply_loss(loss: Loss, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Call ``loss`` on the tensors it names (``loss.inputs``) out of what the step offers."""
    missing = [k for k in loss.inputs if k not in inputs]
    if missing:
        raise ValueError(f"loss {loss.name!r} needs {', '.join(missing)}; this training step "
                         f"offers {', '.join(inputs)}")
    return loss(*(inputs[k] for k in loss.inputs))


class Callback:
    """Hooks the loop calls; pruning implements them (``common.pruning.cycles.PruneCallback``)."""

    def on_start(self, trainer: "Trainer") -> None: ...

    def on_step_begin(self, trainer: "Trainer") -> None: ...

    def extra_loss(self, trainer: "Trainer") -> tuple[torch.Tensor, dict] | None:
        """A term added to this step's loss (and its logged parts), e.g. L0's Lagrangian."""
        return None

    def on_step_end(self, trainer: "Trainer", batch: dict) -> None: ...

    def save_files(self, trainer: "Trainer", directory: Path) -> None:
        """Write the callback's own files into a checkpoint being written."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, data: dict) -> None: ...


class Trainer:
    def __init__(self, args: TrainArgs, stage: str, schedule: Callable[["Trainer"], Callable[[int], float]],
                 callback: Callback | None = None):
        """``schedule(trainer)`` returns the LR factor function for LambdaLR; it is called once
        the model is loaded (and, on resume, the callback's state restored)."""
        args.validate()
        self.args, self.stage, self.callback = args, stage, callback or Callback()
        if args.threads:
            torch.set_num_threads(args.threads)
        self.rank, self.world_size, self.device = init_distributed(args.device)
        if args.precision == "bf16" and self.device.type == "cpu" and cpu_has_native_bf16() is False:
            log.warning("--precision bf16 on a CPU without native bf16 (no avx512_bf16 / amx_bf16 flag): "
                        "autocast is emulated and trains many times slower than --precision fp32")
            tqdm.write("warning: --precision bf16 on a CPU without native bf16 (no avx512_bf16 / amx_bf16): "
                       "emulated, many times slower than --precision fp32")
        if args.batch_size % (args.group_size * self.world_size):
            raise ValueError(f"--batch_size {args.batch_size} (the global batch, in pairs) must split "
                             f"into whole rows of {args.group_size} passages over {self.world_size} processes")
        source_state = read_source_state(args.checkpoint_dir) if args.checkpoint_dir else None
        self.resuming = bool(source_state and source_state["stage"] == stage)
        if self.resuming:
            check_resume_args(args, source_state, args.checkpoint_dir)
        self.output_dir = Path(args.output_dir)
        self._backup: Path | None = None

        torch.manual_seed(args.seed)  # a fresh scoring head is initialised from this seed
        loaded = load_model(args.checkpoint_dir or args.model_tag, self.device,
                            kind=args.model_kind, pooling=args.pooling,
                            head=None if args.checkpoint_dir else args.head,
                            heads=None if args.checkpoint_dir else args.heads)
        self.model, self.tokenizer, self.state = loaded.model, loaded.tokenizer, loaded.state
        self.loaded = loaded  # the student, as common.serving.rank scores it (Trainer.evaluate)
        self.kind = loaded.kind
        self.segment = is_segment(self.model)
        kind = KINDS[self.kind]
        kind.check_args(args, self.model)
        if args.distill_hidden and args.distill_scores and not kind.distill_beside_scores:
            raise ValueError(f"--distill_hidden: a {self.kind} model trained on --distill_scores "
                             "does not run its --distill_from teacher")
        self.training_kind = kind(self.model, self.tokenizer, self.device, args.max_length, args.precision)
        self._set_query_encoder(args)
        self.loss, self.distill = self._pick_losses()
        self.base_model = (source_state or {}).get("base_model", args.model_tag)
        self.masks = loaded.masks
        # the module that runs forward/backward: DDP averages gradients over ranks
        self.forward_model = (DistributedDataParallel(self.model, device_ids=[self.device] if
                                                      self.device.type == "cuda" else None)
                              if self.world_size > 1 else self.model)
        self.teacher = (load_model(args.distill_from, self.device, kind=self.kind).model.eval()
                        if args.distill_from else None)
        self.teacher_scores = None  # (rows, group_size), already multiplied by distill_scale
        if args.distill_scores:
            self.teacher_scores = read_teacher_scores(args.distill_scores, args.group_size) * args.distill_scale
        if args.eval_candidates_file and not args.allow_eval_overlap:
            check_no_eval_overlap(args.train_triples_file, args.eval_candidates_file)
        # every input is loaded: only now may an old output dir be moved aside
        if self.is_main:
            self._prepare_output_dir()
        barrier()

        self.total_steps = args.num_training_samples // args.batch_size
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=args.learning_rate)
        if self.resuming:
            self.callback.load_state_dict(source_state.get("callback", {}))
        self.scheduler = LambdaLR(self.optimizer, schedule(self))
        self.scaler = torch.amp.GradScaler("cuda", enabled=args.precision == "fp16")
        self.step = 0  # optimizer steps in this stage
        self.metrics: list[dict] = []
        if self.resuming:
            self._load_training_state(Path(args.checkpoint_dir), source_state)
        else:
            previous = (source_state or {}).get("seen_pairs", 0)
            self.seen_pairs = args.seen_pairs if args.seen_pairs is not None else previous
            zero_dead_weights(self.model, self.state, self.optimizer)
        self.callback.on_start(self)
        self._eval_data = None

    # -- set-up ----------------------------------------------------------------------------
    def _inputs(self) -> dict[str, Path]:
        a = self.args
        named = {"--train_triples_file": a.train_triples_file, "--checkpoint_dir": a.checkpoint_dir,
                 "--distill_scores": a.distill_scores, "--distill_from": a.distill_from,
                 "--eval_candidates_file": a.eval_candidates_file, "--eval_qrels_file": a.eval_qrels_file,
                 "--model_tag": a.model_tag if a.model_tag and Path(a.model_tag).exists() else None}
        return {flag: Path(v).resolve() for flag, v in named.items() if v}

    def _prepare_output_dir(self) -> None:
        """Refuse an output dir that is, holds or lies inside an input; with --overwrite, move
        an old run aside (``.<name>.replaced``) and delete it only once this stage has ended
        (a failed stage puts it back). Only run artifacts may be in the way: anything else in
        the old dir is an error, never deleted."""
        out = self.output_dir
        real = out.resolve()
        inside = self.resuming and Path(self.args.checkpoint_dir).resolve().parent == real
        for flag, path in self._inputs().items():
            if inside and flag == "--checkpoint_dir":
                continue
            if path == real or real in path.parents:
                raise ValueError(f"--output_dir {out} holds the input {flag} {path}: choose another "
                                 "output dir")
        if out.exists() and any(out.iterdir()) and not inside:
            if not self.args.overwrite:
                raise FileExistsError(f"output_dir {out} is not empty (use --overwrite to replace it)")
            foreign = sorted(p.name for p in out.iterdir() if not is_run_artifact(p))
            if foreign:
                raise FileExistsError(f"--overwrite refuses to delete {out}: it holds files this "
                                      f"script did not write: {', '.join(foreign[:5])}")
            self._backup = out.with_name(f".{out.name}.replaced")
            if self._backup.exists():  # left by an overwrite that was killed: never delete it
                raise FileExistsError(f"{self._backup} holds the run an interrupted --overwrite set "
                                      f"aside: restore it or remove it, then re-run")
            os.replace(out, self._backup)
        out.mkdir(parents=True, exist_ok=True)

    def _finish_backup(self, ok: bool) -> None:
        if not (self.is_main and self._backup and self._backup.exists()):
            return
        if ok:
            shutil.rmtree(self._backup)
        else:  # the new stage failed: put the old run back
            shutil.rmtree(self.output_dir, ignore_errors=True)
            os.replace(self._backup, self.output_dir)
        self._backup = None

    def _set_query_encoder(self, args: "TrainArgs") -> None:
        """--query_encoder (bi only), or the one the checkpoint's config names: load it frozen
        for the training forward and write it into the student's config (every checkpoint,
        the in-training evaluation and later stages read it there)."""
        saved = getattr(self.model.config, QUERY_ENCODER_FIELD, None)

        def where(name):  # a local dir by its absolute path, anything else by its name
            return str(Path(name).resolve()) if Path(name).is_dir() else name
        if args.query_encoder and saved and where(args.query_encoder) != where(query_encoder_of(self.loaded)):
            raise ValueError(f"--query_encoder {args.query_encoder!r}: the checkpoint's queries are "
                             f"embedded by {saved!r} (its config.json); a model keeps its query encoder")
        name = args.query_encoder or saved
        if not name:
            return
        if self.kind != "bi":
            raise ValueError(f"--query_encoder is for bi-encoders; this is a {self.kind} model")
        setattr(self.model.config, QUERY_ENCODER_FIELD, name)
        path = query_encoder_of(self.loaded)
        if Path(path).is_dir():  # a local dir: its absolute path, so every checkpoint finds it
            setattr(self.model.config, QUERY_ENCODER_FIELD, str(Path(path).resolve()))
        encoder = load_model(path, self.device, kind="bi")
        check_query_encoder(self.loaded, encoder, name)
        encoder.model.eval().requires_grad_(False)
        self.training_kind.query_encoder = encoder.model

    def _pick_losses(self) -> tuple[Loss, Loss | None]:
        """The task loss (on labels, or with --distill_scores the --distill_loss) and, with
        --distill_from, the loss to that model's scores or embeddings."""
        a = self.args
        task = get_loss(a.distill_loss) if a.distill_scores else self.training_kind.label_loss(a, self.model)
        distill = None
        if a.distill_from:
            distill = get_loss("embedding_mse" if a.distill_target == "embeddings" else "margin_mse")
        return task, distill

    def _param_groups(self) -> list[dict]:
        """AdamW weight decay on matrices only: none on LayerNorm weights and biases; the
        segment head's gates in a group of their own (--gate_learning_rate, no decay)."""
        gates = [self.model.cross_gate] if self.segment else []
        rest = [p for p in self.model.parameters() if not any(p is g for g in gates)]
        groups = [{"params": [p for p in rest if p.ndim > 1], "weight_decay": self.args.weight_decay},
                  {"params": [p for p in rest if p.ndim <= 1], "weight_decay": 0.0}]
        if gates:
            groups.append({"params": gates, "weight_decay": 0.0,
                           "lr": self.args.gate_learning_rate or self.args.learning_rate})
        return groups

    def _load_training_state(self, ckpt: Path, state: dict) -> None:
        def load(name: str, device=self.device):
            try:  # weights_only: a pickled object other than tensors and containers is refused
                return torch.load(ckpt / name, map_location=device, weights_only=True)
            except FileNotFoundError:
                raise DataError(f"{ckpt / name}: missing: the checkpoint cannot be resumed") from None
            except Exception as err:  # corrupt file, refused pickle
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise DataError(f"{ckpt / name}: unreadable or unsafe: {first}") from None
        self.optimizer.load_state_dict(load(OPTIMIZER_FILE))
        self.scheduler.load_state_dict(load(SCHEDULER_FILE))
        rng = load(self._rng_file(), device="cpu")  # RNG states are CPU tensors
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and "cuda" in rng:
            torch.cuda.set_rng_state_all(rng["cuda"])
        if "scaler" in rng:
            self.scaler.load_state_dict(rng["scaler"])
        self.seen_pairs, self.step = state["seen_pairs"], state["step"]
        self.metrics = state.get("metrics", [])
        # drop log lines past this checkpoint (from a run that went on before it stopped)
        metrics_path = self.output_dir / METRICS_FILE
        if self.is_main and metrics_path.exists():
            keep = [line for line in metrics_path.read_text().splitlines()
                    if line and json.loads(line)["seen_pairs"] <= self.seen_pairs]
            atomic_write_text(metrics_path, "".join(line + "\n" for line in keep))

    # -- the loop --------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def stage_pairs(self) -> int:
        return self.step * self.args.batch_size

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train(self) -> Path | None:
        try:
            last = self._train()
        except BaseException:
            self._finish_backup(ok=False)
            raise
        self._finish_backup(ok=True)
        return last

    def _train(self) -> Path | None:
        args = self.args
        n = args.group_size
        triples_per_step = args.batch_size // n // self.world_size  # this rank's share of rows
        stream = iter(TriplesStream(args.train_triples_file, skip_triples=self.seen_pairs // n,
                                    rank=self.rank, world_size=self.world_size, passages=n))
        bar = tqdm(total=args.num_training_samples, initial=self.stage_pairs, unit="pairs",
                   desc=self.stage, dynamic_ncols=True, disable=not self.is_main)
        last_checkpoint = None
        self.model.train()
        while self.step < self.total_steps:
            triples = list(islice(stream, triples_per_step))
            if len(triples) < triples_per_step:
                raise DataError(f"{args.train_triples_file}: the training stream ended after "
                                f"{self.seen_pairs // n + len(triples)} rows; this stage needs "
                                f"{(self.seen_pairs + args.batch_size * (self.total_steps - self.step)) // n}")
            lr = self.lr()  # the LR this step uses
            self.callback.on_step_begin(self)
            loss, parts = self._train_step(triples)
            self.step += 1
            self.seen_pairs += args.batch_size
            self.callback.on_step_end(self, self._last_batch)
            if self.step % args.log_every == 0 or self.step == self.total_steps:
                if self.world_size > 1:
                    loss = all_reduce_sum([loss], self.device)[0] / self.world_size
                self.log_event("train", loss=loss, lr=lr, **parts)
            bar.update(args.batch_size)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                            heads=self.state.total_heads, ffn=self.state.total_ffn)
            every = args.num_checkpoint_samples
            if (every and self.stage_pairs % every == 0) or self.step == self.total_steps:
                last_checkpoint = self.save_checkpoint()
        bar.close()
        return last_checkpoint

    def _teacher_rows(self, n: int) -> torch.Tensor:
        """Teacher scores of this rank's rows, ``(n, group_size)``: global rows first + rank +
        k * world_size (row i of the parquet belongs to row i of the training file)."""
        first = self.seen_pairs // self.args.group_size + self.rank
        rows = torch.arange(first, first + n * self.world_size, self.world_size)
        if int(rows[-1]) >= len(self.teacher_scores):
            raise DataError(f"{self.args.distill_scores}: {len(self.teacher_scores)} rows, "
                            f"fewer than the training rows used ({int(rows[-1]) + 1})")
        return self.teacher_scores[rows].to(self.device)

    def _train_step(self, rows: list[tuple[str, ...]]) -> tuple[float, dict]:
        """One optimizer step: the task loss (``self.loss``: the --distill_loss to the teacher
        scores of --distill_scores, else the kind's loss on labels) on the kind's forward pass,
        plus, with --distill_from, the distillation loss (``self.distill``) to the teacher's
        counterpart, combined as the kind says (``common.models.kinds``)."""
        kind = self.training_kind
        hidden = self.args.distill_hidden > 0
        with LayerOutputs(self.model) if hidden else nullcontext() as student_layers:
            student = kind.forward(self.forward_model, rows, self.loss.inputs)
        self._last_batch = student.batch
        if self.teacher_scores is not None:
            student.inputs["teacher_scores"] = self._teacher_rows(len(rows))
        task = apply_loss(self.loss, student.inputs)
        if self.teacher is None or (self.teacher_scores is not None and not kind.distill_beside_scores):
            loss, parts = task, {}
        else:
            with torch.no_grad(), LayerOutputs(self.teacher) if hidden else nullcontext() as teacher_layers:
                teacher = kind.teacher_forward(self.teacher, rows, student)
            distill = self.distill(*kind.distill_inputs(student, teacher, self.args.distill_target))
            loss = kind.combine(task, distill, self.args)
            parts = {kind.task_key: task.item(), "distill": distill.item()}
            if hidden:
                layers = hidden_mse(student_layers, teacher_layers)
                loss = loss + self.args.distill_hidden * layers
                parts["hidden"] = layers.item()
        extra = self.callback.extra_loss(self)
        if extra is not None:
            parts = {"task_loss": loss.item(), **parts, **extra[1]}
            loss = loss + extra[0]
        self._update(loss)
        return loss.item(), parts

    def _update(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- logging, evaluation, checkpoints ------------------------------------------------------
    def log_event(self, event: str, **values) -> dict:
        st = self.state
        record = {"event": event, "stage": self.stage, "seen_pairs": self.seen_pairs,
                  "stage_pairs": self.stage_pairs, "heads": st.total_heads, "ffn": st.total_ffn,
                  "head_sparsity": round(1 - st.total_heads / (st.num_heads * st.num_layers), 4),
                  "ffn_sparsity": round(1 - st.total_ffn / (st.ffn_size * st.num_layers), 4),
                  **values}
        if not self.is_main:
            return record
        with open(self.output_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def evaluate(self) -> dict:
        """Re-rank the eval candidates; TREC DL measures (see common.evaluation.trec)."""
        if not self.args.eval_candidates_file:
            return {}
        if self._eval_data is None:
            candidates = read_candidates(self.args.eval_candidates_file)
            qrels = read_qrels(self.args.eval_qrels_file)
            if self.args.eval_max_queries:
                judged = [q for q in candidates["qid"].unique() if q in qrels]
                keep = set(judged[:self.args.eval_max_queries])
                candidates = candidates[candidates["qid"].isin(keep)]
                qrels = {q: r for q, r in qrels.items() if q in keep}
            self._eval_data = (candidates, qrels)
        candidates, qrels = self._eval_data
        ranker = Ranker.from_loaded(self.loaded, backend_for_precision(self.args.precision),
                                    max_length=self.args.max_length, batch_size=self.args.eval_batch_size)
        scores = ranker.score(candidates["query"].tolist(), candidates["passage"].tolist())
        means, _per_query = evaluate_run(candidates_to_run(candidates.assign(score=scores), "score"), qrels)
        return means

    def checkpoint_name(self) -> str:
        return checkpoint_name(self.seen_pairs, None if self.stage == "initial" else self.state.tag())

    def _rng_file(self) -> str:
        return rng_file(self.rank)

    def save_checkpoint(self) -> Path:
        """Rank 0 evaluates and writes; every rank adds its own RNG state; then the rename."""
        started = time.time()
        final = self.output_dir / self.checkpoint_name()
        tmp = self.output_dir / f".tmp-{final.name}"
        if self.is_main and tmp.exists():
            shutil.rmtree(tmp)
        barrier()
        tmp.mkdir(parents=True, exist_ok=True)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        if self.scaler.is_enabled():
            rng["scaler"] = self.scaler.state_dict()
        torch.save(rng, tmp / self._rng_file())
        barrier()  # every rank's RNG state is in tmp before rank 0 renames it
        if self.is_main:
            self._write_checkpoint(tmp, final, started)
        barrier()
        return final

    def _write_checkpoint(self, tmp: Path, final: Path, started: float) -> None:
        measures = self.evaluate()
        save_model(self.model, self.tokenizer, self.state, tmp)
        torch.save(self.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        torch.save(self.scheduler.state_dict(), tmp / SCHEDULER_FILE)
        self.callback.save_files(self, tmp)
        entry = {"seen_pairs": self.seen_pairs, "stage_pairs": self.stage_pairs,
                 "heads": self.state.total_heads, "ffn": self.state.total_ffn, **measures}
        self.metrics.append(entry)
        state = {"stage": self.stage, "seen_pairs": self.seen_pairs, "step": self.step,
                 "base_model": self.base_model, "args": asdict(self.args),
                 "versions": library_versions(), "metrics": self.metrics,
                 "callback": self.callback.state_dict(), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        replace_dir(tmp, final)
        self.log_event("checkpoint", path=str(final), seconds=round(time.time() - started, 1), **measures)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in measures.items())
        tqdm.write(f"[{self.stage}] checkpoint {final} {shown}")
