"""What every numbered script does around its one call into common/: parse, run, report."""
from __future__ import annotations

import argparse
import sys

from transformers import HfArgumentParser

from common.data import DataError


def parse(dataclasses: list, doc: str, argv=None, extra=None):
    """Dataclass arguments (tevatron style); ``extra(parser)`` may add positionals."""
    parser = HfArgumentParser(dataclasses, description=doc,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra:
        extra(parser)
    *objs, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    return objs


def fail(err: Exception) -> None:
    sys.exit(f"error: {err}")


def run_stage(args, stage: str, schedule, callback=None):
    """Train one stage; print where the checkpoints went."""
    from common.trainer import Trainer

    try:
        trainer = Trainer(args, stage, schedule, callback)
        last = trainer.train()
    except (DataError, FileExistsError, ValueError) as err:
        fail(err)
    print(f"[{stage}] {trainer.seen_pairs} pairs seen; last checkpoint: {last}; "
          f"log: {trainer.output_dir / 'metrics.jsonl'}")
    return last
