"""The arguments of every training stage (02 and the 03* scripts): one declaration per argument
(``common.training.argtypes.arg``: help, --help group, range, choices, resume rule); the groups
and the fields a resumed stage may change are read from those declarations."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from common.models import m3
from common.models.segment import HEADS
from common.models.st_format import POOLING_CHOICES
from common.training.argtypes import arg, argument_groups, check_declared, declared
from common.kinds import KINDS
from common.training.losses import loss_class, score_distillation_losses

DEFAULT_DISTILL_LOSS = "margin_mse"


@dataclass
class TrainArgs:
    """Arguments shared by 02_train_initial.py and the 03* pruning scripts."""

    train_triples_file: str = arg(group="data", help="query<TAB>positive<TAB>negative TSV")
    output_dir: str = arg(group="run", resume_may_change=True, help="checkpoints go to output_dir/seen_.../")
    num_training_samples: int = arg(group="optimisation", bounds=(0, None, True, False),
        help="pairs to train in this stage")
    num_checkpoint_samples: int = arg(0, group="run", bounds=(0, None, False, False), resume_may_change=True,
        help="checkpoint every N pairs (0: only at the end); a multiple of batch_size")
    model_tag: Optional[str] = arg(None, group="model", resume_may_change=True,
        help="start model: local dir, hub name or packaged tag (all-MiniLM-L6-v2)")
    checkpoint_dir: Optional[str] = arg(None, group="model", resume_may_change=True,
        help="the model to start this stage from (a checkpoint of an earlier stage, a model dir "
             "or tag), or with --resume a checkpoint of this stage to resume")
    resume: bool = arg(False, group="model", resume_may_change=True,
        help="resume --checkpoint_dir, a checkpoint of this stage (exactly: optimizer, "
             "scheduler, RNG and data position); without it a stage always starts")
    eval_candidates_file: Optional[str] = arg(None, group="evaluation", resume_may_change=True,
        help="candidates parquet re-ranked at every checkpoint (NDCG@10 to metrics.jsonl)")
    eval_qrels_file: Optional[str] = arg(None, group="evaluation", resume_may_change=True,
        help="qrels of the eval topics")
    learning_rate: float = arg(7e-6, group="optimisation", bounds=(0, None, True, False), help="peak LR")
    batch_size: int = arg(32, group="optimisation", bounds=(0, None, True, False),
        help="pairs per optimizer step (even)")
    warmup_fraction: float = arg(0.1, group="optimisation", bounds=(0, 1, False, True),
        help="linear warmup share (02)")
    weight_decay: float = arg(0.01, group="optimisation", bounds=(0, None, False, False))
    max_grad_norm: float = arg(1.0, group="optimisation", bounds=(0, None, True, False))
    max_length: int = arg(256, group="data", bounds=(4, None, False, False),
        help="tokens per pair; the passage is truncated")
    seed: int = arg(42, group="optimisation")
    seen_pairs: Optional[int] = arg(None, group="data", bounds=(0, None, False, False), resume_may_change=True,
        help="pairs of the triples stream already used (default: from the checkpoint)")
    device: str = arg("auto", group="run", resume_may_change=True, help="auto, cpu, cuda, cuda:1 ...")
    precision: str = arg("fp32", group="run", choices=("fp32", "bf16", "fp16"),
        help="fp32, bf16 (autocast) or fp16 (CUDA)")
    threads: Optional[int] = arg(None, group="run", bounds=(1, None, False, False), resume_may_change=True,
        help="torch.set_num_threads")
    eval_batch_size: int = arg(64, group="evaluation", bounds=(1, None, False, False), resume_may_change=True)
    eval_max_queries: Optional[int] = arg(None, group="evaluation", bounds=(1, None, False, False), resume_may_change=True,
        help="evaluate checkpoints on the first N eval queries only (cheaper monitoring; "
             "05_eval_trec.py reports the full set)")
    log_every: int = arg(1, group="run", bounds=(1, None, False, False), resume_may_change=True,
        help="log to metrics.jsonl every N steps")
    distill_from: Optional[str] = arg(None, group="distillation",
        help="teacher checkpoint: adds margin-MSE on (pos - neg) score margins")
    distill_weight: float = arg(1.0, group="distillation", bounds=(0, None, False, False))
    distill_hidden: float = arg(0.0, group="distillation", bounds=(0, None, False, False),
        help="with --distill_from: weight of a layer-wise MSE between the student's and the "
             "teacher's hidden states (layer i vs layer i, padding excluded; common.training.hidden)")
    cache_teacher: bool = arg(False, group="distillation",
        help="bi-encoders: embed every distinct text of the stage's training rows with the frozen "
             "--distill_from teacher once, before the first step (length-sorted batches), and look the "
             "embeddings up at each step instead of running the teacher (memory: texts x dim x 4 bytes)")
    distill_scores: Optional[str] = arg(None, group="distillation",
        help="teacher scores parquet (teacher_pos, teacher_neg; row i = triple i): train on "
             "margin-MSE to the teacher's margins instead of cross-entropy on labels")
    distill_scale: float = arg(1.0, group="distillation", bounds=(0, None, True, False),
        help="teacher scores are multiplied by this")
    distill_loss: str = arg("margin_mse", group="distillation",
        help="with --distill_scores: 'margin_mse' (pairs) or 'kl' (listwise: KL from the "
             "softmax of the scaled teacher scores over each row's passages to the student's), "
             "or any loss registered in common.training.losses that takes scores and teacher scores")
    group_size: int = arg(2, group="data", bounds=(2, None, False, False),
        help="passages per training row: 2 = (query, pos, neg) triples; n > 2 = listwise "
             "groups (query + n passages; --distill_scores with teacher_0..teacher_{n-1}, "
             "--distill_loss kl); --batch_size counts (query, passage) pairs either way")
    model_kind: Optional[str] = arg(None, group="model", resume_may_change=True,
        help="a registered model kind (common.kinds): cross (default) or bi, for a fresh start; "
             "checkpoints know their kind")
    head: Optional[str] = arg(None, group="model", choices=HEADS, resume_may_change=True,
        help="cross-encoder head for a fresh start: classifier (monoBERT, 2 labels; default) or "
             "segment_cosine (starts as the model's own bi-encoder: common.models.segment)")
    gate_learning_rate: Optional[float] = arg(None, group="optimisation", bounds=(0, None, True, False),
        help="segment_cosine head: peak LR of the cross-segment attention gates (default: "
             "--learning_rate; they start shut at 0 and a gate of 1 is full attention)")
    pooling: Optional[str] = arg(None, group="model", choices=POOLING_CHOICES, resume_may_change=True,
        help="bi-encoder pooling: mean, cls, max, lasttoken or weightedmean (default: the model's "
             "sentence-transformers config)")
    heads: Optional[str] = arg(None, group="model", resume_may_change=True,
        help="bi-encoder heads for a fresh start: dense (default) or dense,sparse,colbert (BGE-M3: "
             "the sparse and ColBERT heads from the model dir's sparse_linear.pt / colbert_linear.pt, "
             "else new; unified in-batch training with self-distillation, common.models.m3); "
             "checkpoints know theirs")
    query_instruction: Optional[str] = arg(None, group="model", resume_may_change=True,
        help="bi-encoder, fresh start: text put in front of every query (e.g. 'Instruct: Given a web "
             "search query, retrieve relevant passages that answer the query\\nQuery: '); saved as the "
             "sentence-transformers 'query' prompt (default: the model dir's own query prompt)")
    query_encoder: Optional[str] = arg(None, group="model",
        help="bi-encoder: a frozen encoder (tag, hub name or path, e.g. the unpruned "
             "all-MiniLM-L6-v2) embeds the queries and the model only the passages; written "
             "into the model's config, so later stages, 05 and common.serving.rank use it (a checkpoint "
             "that names one keeps it)")
    temperature: float = arg(0.02, group="optimisation", bounds=(0, None, True, False),
        help="bi-encoder contrastive loss temperature (in-batch negatives)")
    contrastive_weight: float = arg(1.0, group="optimisation", bounds=(0, None, False, False),
        help="bi-encoder: weight of the in-batch contrastive loss (0: distillation only)")
    lora_rank: int = arg(0, group="optimisation", bounds=(0, None, False, False),
        help="train LoRA adapters of this rank (peft) instead of every weight; merged into the "
             "weights in every checkpoint, so a checkpoint is a plain model (0: full fine-tuning); the "
             "checkpoint also keeps the adapters (lora_adapters.safetensors) for --resume")
    lora_alpha: float = arg(16.0, group="optimisation", bounds=(0, None, True, False),
        help="LoRA scale numerator (scale = alpha / rank)")
    lora_targets: Optional[list[str]] = arg(None, group="optimisation",
        help="names of the linear layers that get adapters (default: every projection of the "
             "layers, e.g. q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)")
    gradient_checkpointing: bool = arg(False, group="optimisation", resume_may_change=True,
        help="recompute each layer's activations in backward instead of keeping them (less memory, "
             "about a third more compute)")
    distill_target: str = arg("scores", group="distillation", choices=("scores", "embeddings"),
        help="with --distill_from: 'scores' (margin-MSE) or, for bi-encoders, 'embeddings' (MSE)")
    overwrite: bool = arg(False, group="run", resume_may_change=True, help="replace a non-empty output_dir")
    group_by_length: bool = arg(False, group="data",
        help="batches of rows of similar length (less padding): windows of 32 batches sorted by "
             "length, batch order shuffled by --seed; deterministic and exactly resumable "
             "(common.data.formats.TrainingBatches)")
    allow_eval_overlap: bool = arg(False, group="data", resume_may_change=True,
        help="train even though some training queries are queries of --eval_candidates_file "
             "(refused by default: monitoring on training queries is no held-out measure)")

    def validate(self) -> None:
        check_declared(self)
        if self.model_kind is not None and self.model_kind not in KINDS:
            raise ValueError(f"--model_kind must be one of {', '.join(KINDS)}, got {self.model_kind!r}")
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
        if self.distill_hidden and not self.distill_from:
            raise ValueError("--distill_hidden distils the hidden states of --distill_from: give it")
        if self.cache_teacher and not self.distill_from:
            raise ValueError("--cache_teacher caches the embeddings of --distill_from: give it")
        if self.cache_teacher and self.distill_hidden:
            raise ValueError("--cache_teacher keeps the teacher's embeddings only; --distill_hidden needs its "
                             "layers at every step: drop one of them")
        if self.query_encoder is not None and not self.query_encoder.strip():
            raise ValueError("--query_encoder must name a model (tag, hub name or path)")
        if self.query_encoder and self.distill_hidden:
            raise ValueError("--distill_hidden compares the student's layers on queries and passages; "
                             "with --query_encoder the student sees passages only: drop one of them")
        if self.heads is not None:
            m3.parse_heads(self.heads)
        if self.lora_targets and not self.lora_rank:
            raise ValueError("--lora_targets needs --lora_rank (the adapters' rank)")
        if bool(self.eval_candidates_file) != bool(self.eval_qrels_file):
            raise ValueError("--eval_candidates_file and --eval_qrels_file go together")


# TrainArgs fields a resumed stage may change (declared with resume_may_change=True); every other
# one must equal the checkpoint's
RESUME_MAY_CHANGE = frozenset(declared(TrainArgs, "resume_may_change"))
# TrainArgs in the groups --help shows (each field declares its group; PruneArgs and L0Args are
# groups of their own)
ARGUMENT_GROUPS = argument_groups(TrainArgs)
