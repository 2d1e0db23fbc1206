"""What every numbered script does around its one call into common/: parse, run, report."""
from __future__ import annotations

import argparse
import sys

from transformers import HfArgumentParser

from common.argtypes import (check_ranges, nonneg_int, positive_float, positive_int,  # noqa: F401
                             unit_float)  # (the scripts import them from here)
from common.data import DataError
from common.trainer import Trainer, check_start_or_resume


def parse(dataclasses: list, doc: str, argv=None, extra=None):
    """Dataclass arguments (tevatron style), each validated once here (its ``validate()``);
    ``extra(parser)`` may add positionals. A bad value exits with one ``error:`` line."""
    parser = HfArgumentParser(dataclasses, description=doc,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra:
        extra(parser)
    try:
        *objs, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as err:  # raised by a dataclass's __post_init__
        fail(err)
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    for obj in objs:
        if hasattr(obj, "validate"):
            try:
                obj.validate()
            except ValueError as err:
                fail(err)
    return objs


def fail(err: Exception) -> None:
    """Exit with one ``error:`` line (a multi-line message from a library is folded)."""
    text = " ".join(str(err).split()) or type(err).__name__
    sys.exit(f"error: {text}")


def run_stage(args, stage: str, schedule, callback=None):
    """Train one stage (started or, with ``--resume``, resumed); print where the checkpoints went."""
    try:
        check_start_or_resume(args, stage)
        trainer = Trainer(args, stage, schedule, callback)
        last = trainer.train()
    except (DataError, FileExistsError, ValueError) as err:
        fail(err)
    print(f"[{stage}] {trainer.seen_pairs} pairs seen; last checkpoint: {last}; "
          f"log: {trainer.output_dir / 'metrics.jsonl'}")
    return last
