"""Recipe settings: one TOML file per registered run, read against the names the recipe declares."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.settings import recipe_settings

ROOT = Path(__file__).resolve().parents[1]


def declared(recipe: str) -> dict[str, str]:
    """The name=default pairs a recipe passes to common.settings."""
    text = (ROOT / recipe).read_text().replace("\\\n", " ")
    call = re.search(r"-m common\.settings \"\$CONFIG\"([^)]*)\)", text)
    assert call, f"{recipe} reads no settings file"
    return dict(word.split("=", 1) for word in call.group(1).split())


def test_every_matched_cost_run_is_a_settings_file_the_recipe_reads():
    names = declared("recipes/matched_cost.sh")
    files = sorted((ROOT / "recipes/config/matched_cost").glob("*.toml"))
    assert len(files) >= 10
    roots = set()
    for file in files:
        settings = recipe_settings(str(file), names)
        assert settings["kind"] in ("bi", "cross") and settings["ratio"] in ("2", "3")
        assert settings["kind"] == "bi" or settings["initial"]  # the cross-encoder names its start
        roots.add((settings["root"], settings["kind"]))
    assert len(roots) == len(files)  # each registered run writes to its own root


def test_a_setting_the_recipe_does_not_declare_is_one_error_line(tmp_path):
    bad = tmp_path / "typo.toml"
    bad.write_text('kind = "bi"\nrecovery_pair = 100\n')
    with pytest.raises(ValueError, match="unknown setting 'recovery_pair'"):
        recipe_settings(str(bad), {"kind": "bi", "recovery_pairs": "12288"})
    listed = tmp_path / "list.toml"
    listed.write_text("pairs = [1, 2]\n")
    with pytest.raises(ValueError, match="must be a string or a number"):
        recipe_settings(str(listed), {"pairs": "1"})
    broken = tmp_path / "broken.toml"
    broken.write_text("pairs = \n")
    out = subprocess.run([sys.executable, "-m", "common.settings", str(broken), "pairs=1"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == "" and out.stderr.count("error:") == 1 and str(broken) in out.stderr


def test_settings_print_shell_assignments_defaults_filled(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text("query_encoder = \"a b's\"\nhidden = true\n")
    out = subprocess.run([sys.executable, "-m", "common.settings", str(file), "query_encoder=", "hidden=0",
                          "pairs=12288"], cwd=ROOT, capture_output=True, text=True, check=True)
    shell = subprocess.run(["bash", "-c", out.stdout + 'printf "%s|%s|%s" "$QUERY_ENCODER" "$HIDDEN" "$PAIRS"'],
                           capture_output=True, text=True, check=True)
    assert shell.stdout == "a b's|1|12288"


def test_the_l3prune_study_settings_are_read_by_its_recipe():
    names = declared("recipes/l3prune.sh")
    for file in sorted((ROOT / "recipes/config/l3prune").glob("*.toml")):
        settings = recipe_settings(str(file), names)
        assert set(settings["recoveries"].split(",")) <= {"full", "lora"}
        assert set(settings["poolings"].split(",")) <= {"mean", "weightedmean", "cls", "max", "lasttoken"}


@pytest.mark.parametrize("recipe, folder", [("recipes/l3prune.sh", "l3prune"), ("recipes/m3.sh", "m3")])
def test_every_study_settings_file_is_read_by_its_recipe(recipe, folder):
    names = declared(recipe)
    files = sorted((ROOT / "recipes/config" / folder).glob("*.toml"))
    assert files
    for file in files:
        settings = recipe_settings(str(file), names)
        assert set(settings) == set(names) and settings["root"].startswith("runs/")


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.sh")))
def test_no_recipe_command_gives_an_option_twice(recipe):
    """The scripts refuse an option given twice: every numbered-script command of a recipe, with the
    arrays it expands, names each flag once (the matched-cost recovery once gave --learning_rate twice)."""
    text = (ROOT / "recipes" / recipe).read_text().replace("\\\n", " ")
    arrays = {m.group(1): m.group(2) for m in re.finditer(r"^\s*(\w+)=\((.*?)\)\s*$", text, re.S | re.M)}
    commands = [line for line in text.splitlines() if re.search(r"\$PY (0[1-6]_\w+\.py)", line)]
    for line in commands:
        words = line + " " + " ".join(body for name, body in arrays.items() if f"${{{name}[@]}}" in line)
        flags = re.findall(r"(?<![\w-])(--[a-z_0-9]+)", words)
        repeated = {f for f in flags if flags.count(f) > 1}
        assert not repeated, (line.strip()[:80], repeated)


def make_checkpoint(run_dir: Path, name: str, complete: bool = True) -> Path:
    path = run_dir / name
    path.mkdir(parents=True)
    if complete:
        (path / "pruning.json").write_text("{}")
    return path


def stage_state_cli(run_dir, end) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.layout", "state", str(run_dir), str(end)], cwd=ROOT,
                          capture_output=True, text=True)


def test_a_stage_that_goes_on_starts_resumes_its_latest_checkpoint_or_is_done(tmp_path):
    run = tmp_path / "recover"
    assert stage_state_cli(run, 2048 + 4096).stdout.strip() == "start"  # no run dir yet
    make_checkpoint(run, "seen_000004096_heads_033_ffn_03072")
    make_checkpoint(run, "seen_000005120_heads_033_ffn_03072", complete=False)  # killed while writing
    make_checkpoint(run, ".tmp-seen_000006144_heads_033_ffn_03072")
    out = stage_state_cli(run, 2048 + 4096)
    assert out.returncode == 0 and out.stdout.strip() == str(run / "seen_000004096_heads_033_ffn_03072")
    make_checkpoint(run, "seen_000006144_heads_033_ffn_03072")
    assert stage_state_cli(run, 6144).stdout.strip() == "done"
    past = stage_state_cli(run, 5000)  # another stage's dir: its checkpoints run past this stage's end
    assert past.returncode == 1 and past.stdout == "" and past.stderr.count("error:") == 1 and "past the stage's end" in past.stderr
    bad = stage_state_cli(run, "end")
    assert bad.returncode == 1 and "usage:" in bad.stderr


def run_recipe(args, env_extra) -> subprocess.CompletedProcess:
    import os
    return subprocess.run(["bash", "recipes/latency_main.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env_extra})


@pytest.mark.parametrize("args, env, message", [
    (["0.5", "again"], {}, "may only be 'continue'"),
    (["0.5"], {"TRAIN_SET": "no/such/set"}, "TRAIN_SET=no/such/set: no triples.tsv there"),
])
def test_the_latency_recipe_refuses_a_bad_argument_in_one_line(args, env, message, tmp_path):
    (tmp_path / "triples.tsv").write_text("q\tp\tn\n")
    (tmp_path / "teacher_scores.parquet").write_bytes(b"")
    out = run_recipe(args, {"DATA": str(tmp_path), "TRAIN_SET": str(tmp_path), **env})
    assert out.returncode == 1 and out.stderr.count("error:") == 1 and message in out.stderr, out.stderr


@pytest.mark.parametrize("setting, message", [
    ("cache_teacher = \"yes\"", "cache_teacher must be true or false, got yes"),
    ("group_by_length = 2", "group_by_length must be true or false, got 2"),
    ("recovery_checkpoints = 5", "recovery_checkpoints must be a positive integer dividing recovery_pairs"),
    ("recovery_checkpoints = 0", "recovery_checkpoints must be a positive integer dividing recovery_pairs"),
    ("kind = \"cross\"\ninitial = \"x\"\ncache_teacher = true", "cache_teacher is for bi-encoders"),
])
def test_the_matched_cost_recipe_refuses_a_bad_setting_in_one_line(setting, message, tmp_path):
    import os
    config = tmp_path / "run.toml"  # refused before any data is made (none could be: no shared dir)
    config.write_text(f"recovery_pairs = 4096\ndata = \"{tmp_path / 'data'}\"\n{setting}\n")
    out = subprocess.run(["bash", "recipes/matched_cost.sh", str(config), "activation"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "SHARED": str(tmp_path / "none")})
    assert out.returncode == 1 and out.stderr.count("error:") == 1 and message in out.stderr, out.stderr
