"""LoRA recovery (peft): low-rank adapters on the linear layers of the layer stack, the rest frozen.

``add_lora(model, rank, alpha, targets)`` injects adapters (``peft``) into the modules whose
last name is one of ``targets`` (default: every projection the family adapter names: q, k, v,
attention output, FFN in/gate/out) and freezes every other weight of the encoder; a
classification head outside the encoder stays trainable. The model object stays what it was
(its modules are wrapped in place), so masks, the training kinds and ``save_model`` see the
same model.

``merged_state_dict(model)`` is what a checkpoint saves: each adapted weight with its adapter
merged in (W + scale * B A), the adapters' own tensors left out, the names of the plain model.
A saved directory is a plain model; nothing of peft is needed to load it.

Exact resume of a LoRA stage: a checkpoint also holds ``lora_adapters.safetensors``, every
trainable tensor (the adapters and whatever is trained beside them: a scoring head, Dense
layers) under the adapted model's names (:func:`save_trainable`). The frozen weights are those
of the stage's start model (named in trainer_state.json), with the units the stage has pruned
zeroed, as the running stage holds them; resume loads those, injects the adapters, loads the
trainable tensors (:func:`load_trainable`) and checks that base + adapters give the
checkpoint's merged weights (:func:`merged_mismatch`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from common.io import save_tensors
from common.layout import LORA_FILE
from common.models.arch import adapter_for, layer_stack

ADAPTER_NAME = "default"


def default_targets(model: nn.Module) -> list[str]:
    adapter = adapter_for(model.config)
    paths = (adapter.query, adapter.key, adapter.value, adapter.attn_out, adapter.ffn_in,
             adapter.ffn_gate, adapter.ffn_out)
    return sorted({p.rpartition(".")[2] for p in paths if p})


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str] | None = None,
             dropout: float = 0.0) -> list[str]:
    """Inject LoRA adapters in place; returns the names of the adapted modules.

    A target that names no linear layer of the layer stack is a ``ValueError`` (one line,
    listing the names there are)."""
    from peft import LoraConfig, inject_adapter_in_model

    stack = layer_stack(model, adapter_for(model.config))
    linear_names = sorted({name.rpartition(".")[2] for name, m in stack.named_modules()
                           if isinstance(m, nn.Linear)})
    targets = list(targets or default_targets(model))
    unknown = [t for t in targets if t not in linear_names]
    if unknown:
        raise ValueError(f"--lora_targets {' '.join(unknown)}: no such linear layer in the model's layers "
                         f"(its linear layers: {', '.join(linear_names)})")
    if rank <= 0:
        raise ValueError(f"--lora_rank must be positive, got {rank}")
    encoder = model.base_model
    for param in encoder.parameters():
        param.requires_grad_(False)
    prefix = f"{adapter_for(model.config).layers}."
    pattern = rf"^{prefix.replace('.', r'[.]')}\d+[.](.*[.])?({'|'.join(targets)})$"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern,
                        bias="none")
    inject_adapter_in_model(config, encoder, adapter_name=ADAPTER_NAME)
    adapted = [name for name, m in encoder.named_modules() if _is_lora(m)]
    if not adapted:  # pragma: no cover - the names were checked above
        raise ValueError(f"--lora_targets {' '.join(targets)} matched no module")
    return adapted


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def has_lora(model: nn.Module) -> bool:
    return any(_is_lora(m) for m in model.modules())


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict: LoRA deltas merged into their base weights (see above)."""
    state = model.state_dict()
    if not has_lora(model):
        return state
    deltas = {}
    for name, module in model.named_modules():
        if _is_lora(module) and ADAPTER_NAME in module.lora_A:
            deltas[f"{name}.base_layer.weight"] = module.get_delta_weight(ADAPTER_NAME)
    out = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if key in deltas:
            value = (value.float() + deltas[key].float()).to(value.dtype)
        out[key.replace(".base_layer.", ".")] = value
    return out


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the stage trains (requires grad), by its name in the adapted model."""
    return {name: param.detach().to("cpu").contiguous() for name, param in model.named_parameters()
            if param.requires_grad}


def save_trainable(model: nn.Module, directory: str | Path) -> None:
    save_tensors(trainable_state(model), Path(directory, LORA_FILE))


@torch.no_grad()
def load_trainable(model: nn.Module, checkpoint: str | Path) -> None:
    """Load a checkpoint's ``lora_adapters.safetensors`` into the adapted model: exactly its
    trainable tensors, with their shapes, or a ``ValueError`` naming the file."""
    from safetensors.torch import load_file

    path = Path(checkpoint, LORA_FILE)
    if not path.is_file():
        raise ValueError(f"{path}: missing: this LoRA checkpoint holds merged weights only (written before "
                         "LoRA stages saved their adapters), so it cannot be resumed; start a new stage from it")
    weights = load_file(str(path))
    wanted = {name: param for name, param in model.named_parameters() if param.requires_grad}
    wrong = sorted(set(wanted) ^ set(weights)) or [n for n, p in wanted.items() if p.shape != weights[n].shape]
    if wrong:
        raise ValueError(f"{path}: its tensors are not this stage's trainable weights (e.g. {wrong[0]!r}): "
                         "resume with the checkpoint's --lora_rank / --lora_targets")
    for name, param in wanted.items():
        param.copy_(weights[name].to(param.device, param.dtype))


@torch.no_grad()
def merged_mismatch(model: nn.Module, weights_file: str | Path) -> str | None:
    """The first tensor of a saved model (``model.safetensors``) that the adapted model, merged
    as :func:`merged_state_dict` merges it, does not reproduce (up to 2 units in the last place
    of its dtype); None when all do. Computed one tensor at a time (no second copy of the model)."""
    from safetensors import safe_open

    state = model.state_dict()
    lora = {name: m for name, m in model.named_modules() if _is_lora(m) and ADAPTER_NAME in m.lora_A}
    with safe_open(str(weights_file), framework="pt") as saved:
        for key in saved.keys():
            owner, _, leaf = key.rpartition(".")
            if owner in lora:
                value = state[f"{owner}.base_layer.{leaf}"]
                if leaf == "weight":
                    value = (value.float() + lora[owner].get_delta_weight(ADAPTER_NAME).float()).to(value.dtype)
            elif key in state:
                value = state[key]
            else:
                return key
            expected = saved.get_tensor(key)
            if value.shape != expected.shape:
                return key
            if not torch.equal(value.cpu(), expected):
                a, b = value.float().cpu(), expected.float()
                tol = 2 * torch.finfo(expected.dtype).eps * max(float(b.abs().max()), 1.0)
                if float((a - b).abs().max()) > tol:
                    return key
    return None
