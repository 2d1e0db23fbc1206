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
