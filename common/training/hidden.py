"""Layer-wise hidden-state distillation (``--distill_hidden W``), as CoFi distils layers.

While a model runs, :class:`LayerOutputs` records the hidden states each encoder layer returns
(forward hooks on the adapter's layer stack, so every family and both kinds are covered without
touching their forward code) and the attention mask of each call (a pre-hook on the base model;
the segment head passes its segment ids instead, padding = -1).
:func:`hidden_mse` compares a student's record with its teacher's on the same inputs: student
layer ``i`` against teacher layer ``i`` (pruning keeps the hidden size and, when it drops layers,
keeps the first ones, so no projection is needed), squared error per token over the hidden size,
padding excluded, averaged over tokens, layers and calls (a bi-encoder embeds queries and
passages in separate calls).
"""
from __future__ import annotations

import torch
from torch import nn

from common.models.arch import adapter_for, layer_stack


class LayerOutputs:
    """Context manager: ``states[i]`` lists layer ``i``'s outputs, ``masks`` the attention masks,
    one entry per forward call of ``model`` inside the ``with`` block."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = layer_stack(model, adapter_for(model.config))
        self.states: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.masks: list[torch.Tensor] = []
        self._handles = []

    def __enter__(self) -> "LayerOutputs":
        def keep_mask(module, args, kwargs):
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            if mask is None and kwargs.get("segment_ids") is not None:
                mask = kwargs["segment_ids"] >= 0  # the segment head marks padding -1 instead
            if mask is None:
                raise ValueError("--distill_hidden: the model was called without an attention mask")
            self.masks.append(mask)

        def keep_state(i):
            def hook(module, inputs, output):
                self.states[i].append(output[0] if isinstance(output, tuple) else output)
            return hook

        self._handles = [self.model.base_model.register_forward_pre_hook(keep_mask, with_kwargs=True)]
        self._handles += [layer.register_forward_hook(keep_state(i)) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def hidden_mse(student: LayerOutputs, teacher: LayerOutputs) -> torch.Tensor:
    """Mean squared error between the student's and the teacher's layer outputs (student layer
    ``i`` vs teacher layer ``i``), per token over the hidden size, padding excluded."""
    layers = len(student.layers)
    if layers > len(teacher.layers):
        raise ValueError(f"--distill_hidden: the student has {layers} layers, its teacher only "
                         f"{len(teacher.layers)}")
    if not student.masks or len(student.masks) != len(teacher.masks):
        raise ValueError(f"--distill_hidden: {len(student.masks)} student calls, {len(teacher.masks)} teacher calls")
    total = 0.0
    for i in range(layers):
        for s, t, mask in zip(student.states[i], teacher.states[i], student.masks, strict=True):
            if s.shape != t.shape:
                raise ValueError(f"--distill_hidden: layer {i}: student states {tuple(s.shape)}, "
                                 f"teacher states {tuple(t.shape)}")
            weight = mask.to(torch.float32)[..., None]
            error = (s.float() - t.float()).pow(2) * weight
            total = total + error.sum() / (weight.sum().clamp(min=1.0) * s.shape[-1])
    return total / (layers * len(student.masks))
