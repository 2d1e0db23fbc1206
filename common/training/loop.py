"""The one training loop: ``02`` and every ``03*`` run it; pruning is a callback.

Units are pairs everywhere: a triple (query, positive, negative) gives two pairs, and
``--batch_size``, ``--num_training_samples``, ``--num_checkpoint_samples`` and ``seen_pairs``
count pairs. Checkpoints (``output_dir/seen_{pairs:09d}[_heads_H_ffn_F]/``) hold the model
(safetensors, base config, tokenizer, pruning.json), ``optimizer.pt``, ``scheduler.pt``,
``rng.pt`` and ``trainer_state.json``; they are written to a temporary directory and renamed.
Resuming from one continues with the next unseen triple, the same LR and the same RNG
stream, so N pairs + resume + N pairs equals 2N pairs straight. With ``--group_by_length`` the
rows come in batches of similar length in a seeded order (``common.data.formats.TrainingBatches``),
which a resumed stage recomputes: the same equality holds; and a kind that runs pairs (cross)
runs each batch's sequences in chunks of ``LENGTH_CHUNK`` of similar length, each padded only to
its own longest (``common.kinds.base.chunked_call``: the same function, less padding), except
under DDP, ``--distill_hidden`` or left padding (one forward per step there). Train events log ``elapsed_s``, the
seconds since the process's loop began (``common.training.resume.training_throughput``: pairs/s).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from common.training.args import TrainArgs
from common.training.distributed import all_reduce_sum, barrier, init_distributed, process_group_backend
from common.training.resume import (check_lora_resumed, check_no_eval_overlap, check_resume_args, check_teacher_rows,
                                    library_versions, lora_base, read_metrics, read_source_state, restore_lora_base)
from common.data.formats import (DataError, TrainingBatches, candidates_to_run, read_candidates, read_qrels,
                                 read_teacher_scores)
from common.hardware import cpu_has_native_bf16
from common.data.trec import evaluate_run
from common.training.hidden import LayerOutputs, hidden_mse
from common.io import DirLock, atomic_write_text, refuse_foreign, save_torch
from common.training.losses import Loss, get_loss
from common.kinds import BiKind, kind_of
from common.kinds.loading import load_model, save_model
from common.models.encoders import INNER_QUERY_ENCODER, query_encoder_source
from common.serving.rank import (QUERY_ENCODER_FIELD, Ranker, backend_for_precision, check_query_encoder,
                         query_encoder_of)
from common.layout import (METRICS_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, STATE_FILE, checkpoint_name, is_run_artifact,
                           replace_dir, rng_file)
from common.models.segment import is_segment
from common.models.structure import Masks, zero_dead_weights
from common.models.lora import add_lora, load_trainable, save_trainable

log = logging.getLogger("slimrank")
LENGTH_CHUNK = 16  # --group_by_length: sequences per forward chunk of a cross-encoder batch

def apply_loss(loss: Loss, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Call ``loss`` on the tensors it names (``loss.inputs``) out of what the step offers."""
    missing = [k for k in loss.inputs if k not in inputs]
    if missing:
        raise ValueError(f"loss {loss.name!r} needs {', '.join(missing)}; this training step "
                         f"offers {', '.join(inputs)}")
    return loss(*(inputs[k] for k in loss.inputs))


class Callback:
    """Hooks the loop calls; pruning implements them (``common.pruning.cycles.PruneCallback``)."""

    def stage_args(self) -> dict:
        """The stage's own arguments (e.g. pruning targets): saved in every checkpoint and
        compared on resume like the training arguments."""
        return {}

    def check(self, trainer: "Trainer") -> None:
        """Refuse arguments the loaded model cannot meet (e.g. a target beyond its shape):
        called once the model is loaded, before anything is written or trained."""

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
        if args.precision == "fp16" and self.device.type != "cuda":
            raise ValueError(f"--precision fp16 needs a CUDA device (this run is on {self.device.type}): "
                             "use fp32 or bf16")
        if args.batch_size % (args.group_size * self.world_size):
            raise ValueError(f"--batch_size {args.batch_size} (the global batch, in pairs) must split "
                             f"into whole rows of {args.group_size} passages over {self.world_size} processes")
        source_state = read_source_state(args.checkpoint_dir) if args.checkpoint_dir else None
        self.resuming = bool(source_state and source_state["stage"] == stage)
        if self.resuming:
            check_resume_args(args, source_state, args.checkpoint_dir, self.callback.stage_args())
        self.output_dir = Path(args.output_dir)
        self._backup: Path | None = None

        torch.manual_seed(args.seed)  # a fresh scoring head is initialised from this seed
        loaded = load_model(args.checkpoint_dir or args.model_tag, self.device,
                            kind=args.model_kind, pooling=args.pooling,
                            head=None if args.checkpoint_dir else args.head,
                            query_instruction=args.query_instruction,
                            heads=None if args.checkpoint_dir else args.heads)
        self.lora_base = None  # a LoRA stage: its start model (resume rebuilds the frozen weights from it)
        if args.lora_rank:  # adapters wrap the projections: the masks go on the wrappers' inputs
            loaded.masks.remove()
            self.lora_base = source_state.get("lora_base") if self.resuming else lora_base(args)
            if self.resuming:
                restore_lora_base(loaded, self.lora_base, args.checkpoint_dir)
            add_lora(loaded.model, args.lora_rank, args.lora_alpha, args.lora_targets)
            if self.resuming:
                load_trainable(loaded.model, args.checkpoint_dir)
            loaded.masks = Masks(loaded.model, loaded.state)
            if args.precision == "bf16":  # the frozen weights in bf16 (half the memory), adapters fp32
                for name, param in loaded.model.named_parameters():
                    if not param.requires_grad:
                        param.data = param.data.to(torch.bfloat16)
            if self.resuming:
                check_lora_resumed(loaded.model, args.checkpoint_dir, self.lora_base)
        if args.gradient_checkpointing:
            if not getattr(loaded.model, "supports_gradient_checkpointing", False):
                raise ValueError(f"--gradient_checkpointing: {type(loaded.model).__name__} does not support it")
            loaded.model.activation_checkpointing_enable({"use_reentrant": False})
        self.model, self.tokenizer, self.state = loaded.model, loaded.tokenizer, loaded.state
        self.loaded = loaded  # the student, as common.serving.rank scores it (Trainer.evaluate)
        self.kind = loaded.kind
        self.segment = is_segment(self.model)
        kind = kind_of(self.kind)
        kind.check_args(args, self.model)
        specials = self.tokenizer.num_special_tokens_to_add(pair=kind.pairs)
        if args.max_length <= specials:
            raise ValueError(f"--max_length {args.max_length} leaves no room for text: this model's "
                             f"tokenizer adds {specials} special tokens per sequence")
        if args.distill_hidden and args.distill_scores and not kind.distill_beside_scores:
            raise ValueError(f"--distill_hidden: a {self.kind} model trained on --distill_scores "
                             "does not run its --distill_from teacher")
        # --group_by_length also runs each batch's sequences in length-sorted chunks (less padding still:
        # a row's passages differ in length); one forward per step where DDP or --distill_hidden need it,
        # and for a tokenizer that pads on the left (positions would move with the padding)
        chunk = LENGTH_CHUNK if (args.group_by_length and self.world_size == 1 and not args.distill_hidden
                                 and getattr(self.tokenizer, "padding_side", "right") == "right") else 0
        self.training_kind = kind(self.model, self.tokenizer, self.device, args.max_length, args.precision, chunk)
        if args.cache_teacher and not kind.caches_teacher:
            raise ValueError(f"--cache_teacher: a {self.kind} model's teacher reads each pair whole; only a "
                             "bi-encoder's embeds each text alone")
        self._set_query_encoder(args)
        self.loss, self.distill = self._pick_losses()
        self.base_model = (source_state or {}).get("base_model", args.model_tag)
        self.masks = loaded.masks
        self._refuse_inputs_in_output()
        self.callback.check(self)
        # the module that runs forward/backward: DDP averages gradients over ranks
        if self.world_size > 1:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, self._unused_by_kind())
        self.forward_model = (DistributedDataParallel(self.model, device_ids=[self.device] if
                                                      self.device.type == "cuda" else None)
                              if self.world_size > 1 else self.model)
        self.teacher = (load_model(args.distill_from, self.device, kind=self.kind).model.eval()
                        if args.distill_from else None)
        self.teacher_scores = None  # (rows, group_size), already multiplied by distill_scale
        if args.distill_scores:
            self.teacher_scores = read_teacher_scores(args.distill_scores, args.group_size) * args.distill_scale
            check_teacher_rows(args.distill_scores, len(self.teacher_scores), args.train_triples_file)
        if args.eval_candidates_file and not args.allow_eval_overlap:
            check_no_eval_overlap(args.train_triples_file, args.eval_candidates_file)
        # every input is loaded: only now may an old output dir be moved aside
        self._lock: DirLock | None = None
        if self.is_main:
            self._prepare_output_dir()
        barrier()
        try:
            self._set_up_training(args, schedule, source_state)
        except BaseException:
            self._release()
            self._finish_backup(ok=False)
            raise

    def _set_up_training(self, args: TrainArgs, schedule, source_state: dict | None) -> None:
        self.total_steps = args.num_training_samples // args.batch_size
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=args.learning_rate)
        self._held_bias = self._untrainable_score_bias()
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

    def _refuse_inputs_in_output(self) -> bool:
        """Refuse an output dir that is or holds an input; True when it holds the checkpoint
        this stage resumes (its own run dir)."""
        out = self.output_dir
        real = out.resolve()
        inside = self.resuming and Path(self.args.checkpoint_dir).resolve().parent == real
        for flag, path in self._inputs().items():
            if inside and flag == "--checkpoint_dir":
                continue
            if path == real or real in path.parents:
                raise ValueError(f"--output_dir {out} holds the input {flag} {path}: choose another "
                                 "output dir")
        return inside

    def _prepare_output_dir(self) -> None:
        """Refuse an output dir that is, holds or lies inside an input; with --overwrite, move
        an old run aside (``.<name>.replaced``) and delete it only once this stage has ended
        (a failed stage puts it back). Only run artifacts may be in the way: anything else in
        the old dir is an error, never deleted."""
        out = self.output_dir
        inside = self._refuse_inputs_in_output()
        lock = DirLock(out)
        lock.check()  # another process's run (or a killed one's) is never moved aside nor joined
        if out.exists() and any(out.iterdir()) and not inside:
            if not self.args.overwrite:
                raise FileExistsError(f"output_dir {out} is not empty (use --overwrite to replace it)")
            refuse_foreign(out, is_run_artifact)
            self._backup = out.with_name(f".{out.name}.replaced")
            if self._backup.exists():  # left by an overwrite that was killed: never delete it
                raise FileExistsError(f"{self._backup} holds the run an interrupted --overwrite set "
                                      f"aside: restore it or remove it, then re-run")
            os.replace(out, self._backup)
        out.mkdir(parents=True, exist_ok=True)
        self._lock = lock.acquire()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()

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
        the in-training evaluation and later stages read it there). A local encoder dir is
        saved inside every checkpoint (``query_encoder/``, named relatively): a checkpoint is
        self-contained, and a config never names a path outside its dir."""
        saved = getattr(self.model.config, QUERY_ENCODER_FIELD, None)
        self.query_encoder_path, self._inner_query_encoder = None, None
        if not (args.query_encoder or saved):
            return
        if self.training_kind.pairs:
            raise ValueError(f"--query_encoder is for bi-encoders; this is a {self.kind} model")
        if args.query_encoder:
            path, stored = query_encoder_source(args.query_encoder)
        else:
            path = query_encoder_of(self.loaded)  # inside the checkpoint dir, or refused
            stored = INNER_QUERY_ENCODER if Path(path).is_dir() else path
        encoder = load_model(path, self.device, kind=BiKind.name)
        check_query_encoder(self.loaded, encoder, args.query_encoder or saved)
        if args.query_encoder and saved and not (Path(saved).is_absolute() and saved == path):
            # (an absolute path, written by older versions, may be named again to pack it in)
            ours = load_model(query_encoder_of(self.loaded), kind=BiKind.name) if saved != path else encoder
            a, b = ours.model.state_dict(), encoder.model.state_dict()
            if a.keys() != b.keys() or not all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a):
                raise ValueError(f"--query_encoder {args.query_encoder!r}: the checkpoint's queries are "
                                 f"embedded by {saved!r} (its config.json); a model keeps its query encoder")
        setattr(self.model.config, QUERY_ENCODER_FIELD, stored)
        self.query_encoder_path = path
        if stored == INNER_QUERY_ENCODER:
            self._inner_query_encoder = encoder  # saved into every checkpoint
        encoder.model.eval().requires_grad_(False)
        self.training_kind.query_encoder = encoder.model

    def _pick_losses(self) -> tuple[Loss, Loss | None]:
        """The task loss (on labels, or with --distill_scores the --distill_loss) and, with
        --distill_from, the loss to that model's scores or embeddings."""
        a = self.args
        if a.distill_scores:
            task = get_loss(a.distill_loss)
        else:
            name, options = self.training_kind.label_loss(a, self.model)
            task = get_loss(name, **options)
        distill = None
        if a.distill_from:
            distill = get_loss("embedding_mse" if a.distill_target == "embeddings" else "margin_mse")
        return task, distill

    def _param_groups(self) -> list[dict]:
        """AdamW weight decay on matrices only: none on LayerNorm weights and biases; the
        segment head's gates in a group of their own (--gate_learning_rate, no decay)."""
        gates = [self.model.cross_gate] if self.segment else []
        rest = [p for p in self.model.parameters() if p.requires_grad and not any(p is g for g in gates)]
        groups = [{"params": [p for p in rest if p.ndim > 1], "weight_decay": self.args.weight_decay},
                  {"params": [p for p in rest if p.ndim <= 1], "weight_decay": 0.0}]
        if gates:
            groups.append({"params": gates, "weight_decay": 0.0,
                           "lr": self.args.gate_learning_rate or self.args.learning_rate})
        return groups

    def _global_batch(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An in-batch loss's inputs gathered from every rank (with gradient), so that its
        negatives are the global batch's, as in one process (the rows in rank order: a
        permutation, which the loss does not see). Every rank computes the same global loss;
        the gather's backward sums the ranks' gradients into each rank's own rows (world x
        the one-process gradient), and DDP's average over ranks brings it back."""
        if self.world_size == 1:
            return inputs
        from torch.distributed.nn.functional import all_gather
        return {k: torch.cat(all_gather(v), 0) if k in self.loss.inputs else v for k, v in inputs.items()}

    def _unused_by_kind(self) -> list[str]:
        """Parameters no loss of the kind reaches: a bi-encoder's pooler (the embedding is pooled
        from the last hidden states). They get no gradient on any rank, so DDP must not wait for
        one (it would stop at the second step); one process skips them the same way (AdamW
        leaves a parameter without a gradient as it is)."""
        return self.training_kind.unused_parameters(self.model)

    def _untrainable_score_bias(self) -> nn.Parameter | None:
        """The bias of a 1-label head's output projection when every loss on its score is
        shift-invariant (row softmax, margin MSE, KL): its gradient is zero in exact arithmetic,
        and AdamW would turn the rounding noise of that zero into steps of the learning rate,
        moving the trained score's offset (a CrossEncoder's sigmoid) at random, differently on
        every number of DDP ranks. Its gradient is dropped before each step (AdamW leaves a
        parameter without one as it is): it keeps its trained value."""
        losses = [loss for loss in (self.loss, self.distill) if loss is not None]
        if not self.training_kind.pairs or self.segment or self.model.config.num_labels != 1 \
                or not all(loss.shift_invariant for loss in losses):
            return None
        outputs = [m for m in self.model.modules() if isinstance(m, nn.Linear) and m.out_features == 1]
        return outputs[-1].bias if outputs else None

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
            keep = [line for line, record in read_metrics(metrics_path)
                    if record["seen_pairs"] <= self.seen_pairs]
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
            self._release()
            self._finish_backup(ok=False)
            raise
        self._release()
        self._finish_backup(ok=True)
        return last

    def _train(self) -> Path | None:
        args = self.args
        n = args.group_size
        rows_per_step = args.batch_size // n  # global; rank r trains rows r, r + world, ... of each
        source = TrainingBatches(args.train_triples_file, start_row=self.seen_pairs // n - self.step * rows_per_step,
                                 rows_per_batch=rows_per_step, passages=n, group_by_length=args.group_by_length,
                                 seed=args.seed, skip_batches=self.step)
        if args.cache_teacher:
            self._cache_teacher(source)
        batches = iter(source)
        bar = tqdm(total=args.num_training_samples, initial=self.stage_pairs, unit="pairs",
                   desc=self.stage, dynamic_ncols=True, disable=not self.is_main)
        last_checkpoint = None
        self.model.train()
        started = time.perf_counter()  # train events log the seconds since (elapsed_s: pairs/s)
        while self.step < self.total_steps:
            batch = next(batches, [])
            if len(batch) < rows_per_step:
                raise DataError(f"{args.train_triples_file}: the training stream ended after "
                                f"{source.rows_read} rows; this stage needs "
                                f"{(self.seen_pairs + args.batch_size * (self.total_steps - self.step)) // n}")
            mine = batch[self.rank::self.world_size]
            self._row_indices = [index for index, _ in mine]  # the teacher scores' rows
            triples = [row for _, row in mine]
            lr = self.lr()  # the LR this step uses
            self.callback.on_step_begin(self)
            loss, parts = self._train_step(triples)
            self.step += 1
            self.seen_pairs += args.batch_size
            self.callback.on_step_end(self, self._last_batch)
            if self.step % args.log_every == 0 or self.step == self.total_steps:
                if self.world_size > 1:
                    loss = all_reduce_sum([loss], self.device)[0] / self.world_size
                self.log_event("train", loss=loss, lr=lr, elapsed_s=round(time.perf_counter() - started, 4), **parts)
            bar.update(args.batch_size)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                            heads=self.state.total_heads, ffn=self.state.total_ffn)
            every = args.num_checkpoint_samples
            if (every and self.stage_pairs % every == 0) or self.step == self.total_steps:
                last_checkpoint = self.save_checkpoint()
        bar.close()
        return last_checkpoint

    def _teacher_rows(self, n: int) -> torch.Tensor:
        """Teacher scores of this rank's ``n`` rows of this step, ``(n, group_size)`` (row i of
        the parquet belongs to row i of the training file)."""
        rows = torch.tensor(self._row_indices[:n])
        if int(rows.max()) >= len(self.teacher_scores):
            raise DataError(f"{self.args.distill_scores}: {len(self.teacher_scores)} rows, "
                            f"fewer than the training rows used ({int(rows.max()) + 1})")
        return self.teacher_scores[rows].to(self.device)

    def _train_step(self, rows: list[tuple[str, ...]]) -> tuple[float, dict]:
        """One optimizer step: the task loss (``self.loss``: the --distill_loss to the teacher
        scores of --distill_scores, else the kind's loss on labels) on the kind's forward pass,
        plus, with --distill_from, the distillation loss (``self.distill``) to the teacher's
        counterpart, combined as the kind says (``common.kinds``)."""
        kind = self.training_kind
        hidden = self.args.distill_hidden > 0
        with LayerOutputs(self.model) if hidden else nullcontext() as student_layers:
            student = kind.forward(self.forward_model, rows, self.loss.inputs)
        self._last_batch = student.batch
        if self.teacher_scores is not None:
            student.inputs["teacher_scores"] = self._teacher_rows(len(rows))
        task = apply_loss(self.loss, self._global_batch(student.inputs) if self.loss.in_batch else student.inputs)
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
        if self._held_bias is not None:
            self._held_bias.grad = None
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _cache_teacher(self, source: TrainingBatches) -> None:
        """--cache_teacher: the teacher's embeddings of every text of the rows this stage reads
        (``TrainingBatches.stage_rows``), once; a resumed stage caches the same rows."""
        rows = source.stage_rows(self.total_steps)
        started = time.perf_counter()
        texts = self.training_kind.cache_teacher(self.teacher, rows, progress=self.is_main)
        self.log_event("teacher_cache", texts=texts, seconds=round(time.perf_counter() - started, 2))

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
        """Re-rank the eval candidates; TREC DL measures (see common.data.trec)."""
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
                                    max_length=self.args.max_length, batch_size=self.args.eval_batch_size,
                                    query_encoder=self.query_encoder_path)
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
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        if self.scaler.is_enabled():
            rng["scaler"] = self.scaler.state_dict()
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            save_torch(rng, tmp / self._rng_file())
        except BaseException:  # a full or read-only disk: no half checkpoint left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        barrier()  # every rank's RNG state is in tmp before rank 0 renames it
        if self.is_main:
            self._write_checkpoint(tmp, final, started)
        barrier()
        return final

    def _write_checkpoint(self, tmp: Path, final: Path, started: float) -> None:
        try:  # a failed write (a full or read-only disk) leaves no half checkpoint behind
            measures = self._write_checkpoint_files(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.log_event("checkpoint", path=str(final), seconds=round(time.time() - started, 1), **measures)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in measures.items())
        tqdm.write(f"[{self.stage}] checkpoint {final} {shown}")

    def _write_checkpoint_files(self, tmp: Path, final: Path) -> dict:
        measures = self.evaluate()
        save_model(self.model, self.tokenizer, self.state, tmp)
        if self._inner_query_encoder is not None:  # the config names it relatively: query_encoder/
            q = self._inner_query_encoder
            save_model(q.model, q.tokenizer, q.state, tmp / INNER_QUERY_ENCODER)
        if self.lora_base:
            save_trainable(self.model, tmp)
        save_torch(self.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        save_torch(self.scheduler.state_dict(), tmp / SCHEDULER_FILE)
        self.callback.save_files(self, tmp)
        entry = {"seen_pairs": self.seen_pairs, "stage_pairs": self.stage_pairs,
                 "heads": self.state.total_heads, "ffn": self.state.total_ffn, **measures}
        self.metrics.append(entry)
        state = {"stage": self.stage, "seen_pairs": self.seen_pairs, "step": self.step,
                 "base_model": self.base_model, "args": asdict(self.args),
                 "versions": library_versions(), "metrics": self.metrics,
                 "distributed": {"backend": process_group_backend(), "world_size": self.world_size, "device": str(self.device)},
                 "callback": self.callback.state_dict(), "stage_args": self.callback.stage_args(),
                 **({"lora_base": self.lora_base} if self.lora_base else {}),
                 "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        replace_dir(tmp, final)
        return measures
