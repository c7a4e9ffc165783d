"""Theoretical FLOPs of one training step, read from the real autograd graph of one forward pass.

Every matrix product of the step is a ``Linear`` (LoRA's A/B included), a ``Conv2d`` (the patch
embedding) or an attention core (QKᵀ and PV). For each, forward costs F = 2·m·n·k; the backward costs F
again for the gradient w.r.t. its input *if that input requires grad* (something below it trains, so
autograd must go through it), and F again for the weight gradient *if the weight trains*. A frozen block
above a trainable one thus pays F (activation grads), a frozen block below the lowest trainable one pays
nothing — SPEC §3: "top k of L costs about (1 + 2k/L)/3 of a full step". Elementwise work (norms,
activations, softmax, the loss) and the optimizer are not counted: on a model where matrix work
dominates they are a few per cent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class StepFlops:
    forward: float = 0.0
    activation_grads: float = 0.0
    weight_grads: float = 0.0
    per_kind: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.forward + self.activation_grads + self.weight_grads

    def add(self, kind: str, fwd: float, act: bool, wgrad: bool) -> None:
        self.forward += fwd
        self.activation_grads += fwd if act else 0.0
        self.weight_grads += fwd if wgrad else 0.0
        k = self.per_kind.setdefault(kind, [0.0, 0.0, 0.0])
        k[0] += fwd
        k[1] += fwd if act else 0.0
        k[2] += fwd if wgrad else 0.0

    def to_dict(self) -> dict:
        return {"forward": self.forward, "activation_grads": self.activation_grads,
                "weight_grads": self.weight_grads, "total": self.total}


def _is_attention(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower() and hasattr(module, "q_proj")


class FlopCounter:
    """``with FlopCounter(model) as fc: model(**batch)`` → ``fc.flops`` (a :class:`StepFlops`)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.flops = StepFlops()
        self._handles = []

    def __enter__(self) -> "FlopCounter":
        for module in self.model.modules():
            if isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_hook(self._linear))
            elif isinstance(module, nn.Conv2d):
                self._handles.append(module.register_forward_hook(self._conv))
            elif _is_attention(module):
                self._handles.append(module.register_forward_hook(self._attention, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _linear(self, module: nn.Linear, inputs, output) -> None:
        x = inputs[0]
        rows = x.numel() // module.in_features
        fwd = 2.0 * rows * module.in_features * module.out_features
        self.flops.add("linear", fwd, act=x.requires_grad, wgrad=module.weight.requires_grad)

    def _conv(self, module: nn.Conv2d, inputs, output) -> None:
        x = inputs[0]
        kh, kw = module.kernel_size
        fwd = 2.0 * output.numel() * (module.in_channels // module.groups) * kh * kw
        self.flops.add("conv", fwd, act=x.requires_grad, wgrad=module.weight.requires_grad)

    def _attention(self, module: nn.Module, args, kwargs, output) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        out = output[0] if isinstance(output, tuple) else output
        if hidden is None or hidden.dim() != 3:
            return
        b, t, _ = hidden.shape
        width = module.q_proj.out_features  # heads x head_dim
        # QK^T and PV, each 2*b*t*t*width; their backward (dQ,dK and dP,dV) costs twice that when grads flow
        fwd = 2 * 2.0 * b * t * t * width
        needs = out.requires_grad
        self.flops.add("attention_core", fwd, act=needs, wgrad=needs)
