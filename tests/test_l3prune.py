"""L3Prune layer selection: the loss at every depth, the small / large choice, 04 --keep_layers."""
from __future__ import annotations

import importlib
import json

import pytest

from common.pruning.l3prune import choose, layerwise_losses
from common.models.loading import keep_first_layers
from common.kinds.loading import load_model, score_pairs


def test_choice_of_small_and_large():
    assert choose([3.0, 2.0, 2.5, 1.0, 1.5]) == {"small": 2, "large": 4}
    assert choose([3.0, 2.0, 1.0]) == {"small": 3, "large": 3}  # falls all the way: keep all
    assert choose([1.0, 1.0, 2.0]) == {"small": 1, "large": 1}  # ties: the shallower
    with pytest.raises(ValueError):
        choose([])


@pytest.mark.parametrize("kind", ["cross", "bi"])
def test_layerwise_losses_score_the_cut_models(kind, tiny_models, toy_triples):
    loaded = load_model(str(tiny_models["bert"]), kind=kind)
    losses = layerwise_losses(loaded, str(toy_triples), rows=16, batch_size=8, max_length=32)
    assert len(losses) == 3 and all(x > 0 for x in losses)
    assert len(loaded.state.kept_heads) == 3  # the model itself is untouched
    # the last entry is the loss of the whole model, the first that of the model cut after layer 1
    again = layerwise_losses(loaded, str(toy_triples), rows=16, batch_size=8, max_length=32)
    assert again == losses
    cut = load_model(str(tiny_models["bert"]), kind=kind)
    keep_first_layers(cut, 1)
    one = layerwise_losses(cut, str(toy_triples), rows=16, batch_size=8, max_length=32)
    assert one == pytest.approx(losses[:1], rel=1e-5)


def test_reshape_keeps_the_l3prune_choice(tiny_models, toy_triples, tmp_path):
    reshape = importlib.import_module("04_reshape")
    out = tmp_path / "small"
    reshape.main(["--checkpoint_dir", str(tiny_models["bert"]), "--model_kind", "bi", "--keep_layers", "small",
                  "--layer_loss_triples", str(toy_triples), "--layer_loss_rows", "16", "--output_dir", str(out)])
    info = json.loads((out / "pruning.json").read_text())
    note = info["history"][-1]
    assert note["l3prune"]["rule"] == "small" and len(note["l3prune"]["losses"]) == 3
    assert note["keep_layers"] == note["l3prune"]["small"] == len(info["heads_per_layer"])
    model = load_model(str(out))
    assert len(score_pairs(model.model, model.tokenizer, ["q"], ["p"])) == 1
    with pytest.raises(SystemExit):
        reshape.main(["--checkpoint_dir", str(tiny_models["bert"]), "--keep_layers", "large",
                      "--output_dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        reshape.main(["--checkpoint_dir", str(tiny_models["bert"]), "--keep_layers", "medium",
                      "--output_dir", str(tmp_path / "y")])


def test_small_and_large_from_one_layerwise_loss(tiny_models, toy_triples, tmp_path):
    """The seed's autoprune: `large` reuses the loss `small` computed (--layer_losses), and a loss
    computed on another checkpoint or pooling is refused in one line."""
    reshape = importlib.import_module("04_reshape")
    small, large = tmp_path / "small", tmp_path / "large"
    base = ["--checkpoint_dir", str(tiny_models["bert"]), "--model_kind", "bi", "--pooling", "mean"]
    reshape.main(base + ["--keep_layers", "small", "--layer_loss_triples", str(toy_triples),
                         "--layer_loss_rows", "16", "--output_dir", str(small)])
    reshape.main(base + ["--keep_layers", "large", "--layer_losses", str(small), "--output_dir", str(large)])
    notes = [json.loads((d / "pruning.json").read_text())["history"][-1]["l3prune"] for d in (small, large)]
    assert notes[0]["losses"] == notes[1]["losses"] and notes[1]["rows"] == 16
    assert notes[1]["rule"] == "large" and notes[1]["large"] == choose(notes[0]["losses"])["large"]
    assert json.loads((large / "config.json").read_text())["num_hidden_layers"] == notes[1]["large"]
    with pytest.raises(SystemExit) as exit_:
        reshape.main(base[:-1] + ["cls", "--keep_layers", "large", "--layer_losses", str(small),
                                  "--output_dir", str(tmp_path / "other")])
    err = str(exit_.value.code)
    assert err.count("error:") == 1 and "pooling 'mean'" in err and not (tmp_path / "other").exists()
    with pytest.raises(SystemExit):  # a loss and triples to compute it: one or the other
        reshape.main(base + ["--keep_layers", "large", "--layer_losses", str(small),
                             "--layer_loss_triples", str(toy_triples), "--output_dir", str(tmp_path / "both")])
