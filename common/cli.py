"""What every numbered script does around its one call into common/: parse, run, report."""
from __future__ import annotations

import argparse
import copy
import sys
import tomllib

import torch.distributed as dist
from transformers import HfArgumentParser

from common.training.argtypes import (DECLARATION_KEYS, argument_groups, check_ranges, nonneg_int,  # noqa: F401
                                      parse_args, positive_float, positive_int, repeated_option,
                                      unit_float)  # (scripts import them from here)
from common.data.formats import DataError
from common.training.loop import Trainer
from common.training.resume import check_start_or_resume

CONFIG_HELP = ("--config FILE.toml: settings read first, one `name = value` per argument "
               "(recipes/config/<study>/*.toml); the command line overrides them")


def parse(dataclasses: list, doc: str, argv=None, extra=None):
    """Dataclass arguments (tevatron style) in argument groups, each validated once here (its
    ``validate()``); ``extra(parser)`` may add positionals; ``--config FILE.toml`` supplies
    settings the command line overrides. A bad value exits with one ``error:`` line."""
    parser = DeclaredArgumentParser(dataclasses, description=doc, epilog=CONFIG_HELP,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    for dc in dataclasses:  # each field declares its group (common.training.argtypes.arg)
        groups.update(argument_groups(dc))
    group_arguments(parser, groups)
    if extra:
        extra(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    twice = repeated_option(argv)
    if twice:
        fail(ValueError(f"{twice} is given twice: give each option once (a --config file's "
                        "settings may be overridden on the command line)"))
    argv = with_config(parser, argv)
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


class DeclaredArgumentParser(HfArgumentParser):
    """HfArgumentParser over fields declared with ``common.training.argtypes.arg``: the keys that
    argparse does not know (group, bounds, resume rule) are dropped before it sees a field."""

    @staticmethod
    def _parse_dataclass_field(parser, field):
        plain = copy.copy(field)
        plain.metadata = {k: v for k, v in field.metadata.items() if k not in DECLARATION_KEYS}
        HfArgumentParser._parse_dataclass_field(parser, plain)


def group_arguments(parser: argparse.ArgumentParser, groups: dict) -> None:
    """Show the parser's options in the named groups (argparse keeps one list per group)."""
    where = {dest: name for name, dests in groups.items() for dest in dests}
    made = {name: parser.add_argument_group(name) for name in groups}
    for action in list(parser._actions):
        name = where.get(action.dest)
        if name is None:
            continue
        for group in parser._action_groups:
            if action in group._group_actions and group is not made[name]:
                group._group_actions.remove(action)
        made[name]._group_actions.append(action)


def with_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with the settings of ``--config FILE`` (TOML) in front of the rest, so that the
    command line wins; unknown names and unreadable files are one error line."""
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        return argv
    rest, path = [], None
    items = iter(argv)
    for item in items:
        if item == "--config":
            path = next(items, None)
        elif item.startswith("--config="):
            path = item.split("=", 1)[1]
        else:
            rest.append(item)
    if not path:
        fail(ValueError("--config needs a file"))
    try:
        with open(path, "rb") as f:
            settings = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as err:
        fail(ValueError(f"--config {path}: {err}"))
    known = {a.dest for a in parser._actions}
    tokens = []
    for name, value in settings.items():
        if name not in known or name == "help":
            fail(ValueError(f"--config {path}: unknown setting {name!r} (not an argument of this script)"))
        if isinstance(value, bool):
            value = str(value).lower()
        values = value if isinstance(value, list) else [value]
        tokens += [f"--{name}", *(str(v) for v in values)]
    return tokens + rest


def fail(err: Exception) -> None:
    """Exit with one ``error:`` line (a multi-line message from a library is folded)."""
    text = " ".join(str(err).split()) or type(err).__name__
    sys.exit(f"error: {text}")


def mode_positional(parser: argparse.ArgumentParser) -> None:
    """The optional ``initial|continue`` positional of the pruning scripts (``parse(extra=...)``);
    pass the parsed namespace to :func:`apply_mode`."""
    parser.add_argument("mode", nargs="?", choices=["initial", "continue"], default="initial",
                        help="initial (default): start this stage from --checkpoint_dir; "
                             "continue: resume it (the same as --resume)")


def apply_mode(args, positional) -> None:
    if positional.mode == "continue":
        args.resume = True


def run_stage(args, stage: str, schedule, callback=None):
    """Train one stage (started or, with ``--resume``, resumed); print where the checkpoints went."""
    try:
        check_start_or_resume(args, stage)
        trainer = Trainer(args, stage, schedule, callback)
        last = trainer.train()
    except (DataError, OSError, ValueError) as err:  # OSError: a full or read-only disk, a lock
        fail(err)
    finally:  # a torchrun process group (NCCL / gloo) ends with the stage
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    print(f"[{stage}] {trainer.seen_pairs} pairs seen; last checkpoint: {last}; "
          f"log: {trainer.output_dir / 'metrics.jsonl'}")
    return last
