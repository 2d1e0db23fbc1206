"""Stage entry points accept what the recipes pass them."""
from __future__ import annotations

import importlib

import pytest

from common.data.formats import DataError
from common.training.resume import read_source_state


def test_a_stage_may_start_from_a_packaged_tag_but_not_a_missing_dir(tmp_path):
    """bi_demo.sh / ship.sh start 03c from the packaged encoder itself (`--checkpoint_dir
    all-MiniLM-L6-v2`): no trainer state, a fresh start. A typo'd directory is an error."""
    assert read_source_state("all-MiniLM-L6-v2") is None
    assert read_source_state(tmp_path) is None  # a plain directory: no trainer state
    with pytest.raises(DataError, match="no such directory"):
        read_source_state(tmp_path / "missing")


@pytest.mark.parametrize("script,extra", [("02_train_initial", []),
                                          ("03a_prune_heads", ["--target_sparsity", "0.1"]),
                                          ("03b_prune_intermediates", ["--target_sparsity", "0.25",
                                                                       "--num_prune_cycles", "1"]),
                                          ("03c_prune_mixed", ["--target_heads", "10", "--target_ffn", "30",
                                                               "--num_prune_cycles", "1"])])
def test_start_or_resume_is_said_not_guessed(script, extra, tiny_models, toy_triples, tmp_path, capsys):
    """Every stage: a checkpoint of the same stage needs --resume (03c: `continue`), and
    --resume needs one; the refusal is one error line naming the flag."""
    main = importlib.import_module(script).main
    common = ["--train_triples_file", str(toy_triples), "--batch_size", "8", "--max_length", "32",
              "--threads", "1", "--device", "cpu", "--num_checkpoint_samples", "8", *extra]
    source = ["--model_tag", str(tiny_models["bert"])] if script.startswith("02") else [
        "--checkpoint_dir", str(tiny_models["bert"])]
    main([*source, "--output_dir", str(tmp_path / "a"), "--num_training_samples", "16", *common])
    half = sorted((tmp_path / "a").glob("seen_*"))[0]
    for argv, needle in (([], "pass --resume"), (["--resume"], None)):
        args = ["--checkpoint_dir", str(half), "--output_dir", str(tmp_path / "b"),
                "--num_training_samples", "16", *argv, *common]
        if needle is None:
            main(args)  # resumes: the stage ends at 16 pairs
            assert sorted(p.name for p in (tmp_path / "b").glob("seen_*"))[-1].startswith("seen_000000016")
            continue
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert needle in str(exit_.value) and str(exit_.value).startswith("error:")
    with pytest.raises(SystemExit) as exit_:
        main([*source[:0], "--checkpoint_dir", str(tiny_models["bert"]), "--resume", "--output_dir",
              str(tmp_path / "c"), "--num_training_samples", "16", *common])
    assert "--resume" in str(exit_.value) and "not a training checkpoint" in str(exit_.value)


def capture_help(parse, dataclasses, capsys) -> str:
    with pytest.raises(SystemExit):
        parse(dataclasses, "", ["--help"])
    return capsys.readouterr().out


def test_declared_ranges_choices_and_resume_rules():
    """One declaration per argument (argtypes.arg): its range, choices and resume rule are checked
    from it, for objects built in code as for the command line."""
    from common.pruning.l0 import L0Args
    from common.training.args import RESUME_MAY_CHANGE, TrainArgs

    base = dict(train_triples_file="t.tsv", output_dir="o", num_training_samples=64, model_tag="m")
    TrainArgs(**base).validate()
    for bad, flag in (({"precision": "fp8"}, "--precision"), ({"model_kind": "poly"}, "--model_kind"),
                      ({"group_size": 1}, "--group_size"), ({"learning_rate": float("inf")}, "--learning_rate"),
                      ({"warmup_fraction": float("nan")}, "--warmup_fraction")):
        with pytest.raises(ValueError, match=flag):
            TrainArgs(**base, **bad).validate()
    with pytest.raises(ValueError, match="--gate_init"):
        L0Args(target_macs_ratio=0.5, gate_init=float("nan"))
    assert {"threads", "device", "output_dir"} <= RESUME_MAY_CHANGE
    assert not {"learning_rate", "precision", "distill_from", "max_length"} & RESUME_MAY_CHANGE


def test_arguments_come_in_groups_and_from_config_files(tmp_path, capsys):
    from dataclasses import fields

    from common.cli import parse
    from common.pruning.cycles import PruneArgs
    from common.pruning.l0 import L0Args
    from common.training.argtypes import argument_groups
    from common.training.args import ARGUMENT_GROUPS, TrainArgs

    for dc in (TrainArgs, PruneArgs, L0Args):  # every field declares its group (argtypes.arg)
        grouped = [name for names in argument_groups(dc).values() for name in names]
        assert sorted(grouped) == sorted(f.name for f in fields(dc))
    assert ARGUMENT_GROUPS == argument_groups(TrainArgs)
    help_text = capture_help(parse, [TrainArgs, PruneArgs], capsys)
    assert "optimisation:" in help_text and "pruning:" in help_text and "--bounds" not in help_text
    config = tmp_path / "stage.toml"
    config.write_text('learning_rate = 3e-5\nexclude_layers = ""\ntarget_heads = 9\nprecision = "bf16"\n'
                      'overwrite = true\n')
    need = ["--model_tag", "m", "--train_triples_file", "t.tsv", "--output_dir", "o",
            "--num_training_samples", "64"]
    args, prune = parse([TrainArgs, PruneArgs], "", ["--config", str(config), *need, "--target_heads", "10"])
    assert args.learning_rate == 3e-5 and args.precision == "bf16" and args.overwrite
    assert prune.exclude_layers == "" and prune.target_heads == 10  # the command line wins
    config.write_text("learning_rat = 1e-4\n")
    with pytest.raises(SystemExit) as exit_:
        parse([TrainArgs, PruneArgs], "", ["--config", str(config), *need])
    assert str(exit_.value).startswith("error:") and "learning_rat" in str(exit_.value)
    with pytest.raises(SystemExit) as exit_:
        parse([TrainArgs], "", ["--config", str(tmp_path / "missing.toml"), *need])
    assert "missing.toml" in str(exit_.value)


@pytest.mark.parametrize("script,config", [("02_train_initial", "main/initial"),
                                           ("03c_prune_mixed", "main/prune"),
                                           ("02_train_initial", "main/recover")])
def test_the_main_jobs_config_files_hold_only_arguments_of_their_script(script, config):
    import tomllib

    from common.cli import with_config
    from conftest import ROOT

    path = ROOT / "recipes" / "config" / f"{config}.toml"
    parser_of = {}

    def capture(dataclasses, doc, argv=None, extra=None):  # the script's own parser, not run
        from common.cli import DeclaredArgumentParser
        parser = DeclaredArgumentParser(dataclasses)
        if extra:
            extra(parser)
        parser_of["p"] = parser
        raise SystemExit(0)

    module = importlib.import_module(script)
    original = module.parse
    module.parse = capture
    try:
        with pytest.raises(SystemExit):
            module.main([])
    finally:
        module.parse = original
    tokens = with_config(parser_of["p"], ["--config", str(path)])
    assert len(tokens) >= 2 * len(tomllib.loads(path.read_text()))
