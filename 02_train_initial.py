#!/usr/bin/env python
"""Step 2: fine-tune a base model as a monoBERT cross-encoder on (query, positive, negative) triples.

With --stage recover it trains a pruned, reshaped model further (a recovery stage, e.g. while
distilling the unpruned model: --distill_from). Checkpoints every --num_checkpoint_samples pairs to output_dir/seen_{pairs:09d}/ (exact resume with
--checkpoint_dir). Defaults follow monoBERT (AdamW, weight decay 0.01, 10% linear warmup, linear
decay), scaled from the paper's batch 128 / lr 3e-6 / 100k steps to small batches and budgets.

  python 02_train_initial.py --model_tag all-MiniLM-L6-v2 \
      --train_triples_file data/dl21.judged.triples.tsv --output_dir runs/initial \
      --num_training_samples 6000 --num_checkpoint_samples 2000 \
      --eval_candidates_file data/dl20.bm25.candidates.parquet \
      --eval_qrels_file ../shared/data/trec-dl/dl20/qrels.txt
"""
from common.cli import parse, run_stage
from common.layout import TRAINING_STAGES
from common.training.schedules import WarmupLinear
from common.training.loop import TrainArgs


def main(argv=None) -> None:
    def stage(parser):
        parser.add_argument("--stage", choices=TRAINING_STAGES, default="initial",
                            help="recover: train a pruned (reshaped) model further; its checkpoints "
                                 "are named with their structure and tabled as 'recover'")
    args, extra = parse([TrainArgs], __doc__, argv, extra=stage)
    schedule = lambda t: WarmupLinear(t.total_steps, round(t.total_steps * args.warmup_fraction))  # noqa: E731
    run_stage(args, extra.stage, schedule)


if __name__ == "__main__":
    main()
