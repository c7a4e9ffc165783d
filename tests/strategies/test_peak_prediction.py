"""The plan's peak-memory prediction against the tensors a real training step holds, counted one by one.

RSS (what `freezetune bench --only freeze` measures) also sees the allocator's slack, and CUDA's
max_memory_allocated needs a GPU; counting live tensor storages through a dispatch mode measures the bytes the
formula models, exactly and on any machine, and under bf16 autocast too. The step is the loop's own
(`pipelines.training.step.train_step`) on a model under the loop's precision policy (trained parameters fp32,
frozen ones in the compute dtype), with AdamW's state already made by an earlier step, as in every step but the
first. The peak above the weights is predicted from the strategy's plan at the same batch and length.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.common import ModelSize, make_batch
from benchmarks.freeze import strategies
from pipelines.training.precision import apply_precision_policy
from pipelines.training.step import train_step
from strategies import build_plan

SIZE = ModelSize(hidden=256, layers=4, intermediate=704, heads=4, kv_heads=2, vocab=2000)
BATCH, LENGTH = 4, 128
TOLERANCE = 0.10  # the issue asks 15%; every configuration lands within 4% (0.97x-1.04x) here


class LiveTensors(TorchDispatchMode):
    """The peak of the bytes held by live tensor storages created while the mode is on, above those that
    existed before (``hold``: the weights, gradients and optimizer state the step starts with)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple] = {}
        self.bytes = self.peak = 0

    def hold(self, tensors) -> None:
        for t in tensors:
            self._add(t)
        self.bytes = self.peak = 0  # what was there before counts as the baseline

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key and key not in self.live:
            self.live[key] = (storage._weak_ref(), storage.nbytes())
            self.bytes += storage.nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, size) in list(self.live.items()):
            if torch.UntypedStorage._expired(ref):
                del self.live[key]
                self.bytes -= size
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.peak = max(self.peak, self.bytes)
        return out


@pytest.fixture(scope="module")
def bases():
    return {"text": SIZE.build(vlm=False), "vlm": SIZE.build(vlm=True)}


CONFIGS = [c for c in strategies(SIZE.layers) if c["id"] not in ("text.progressive.stage1",)]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("config", CONFIGS, ids=[c["id"] for c in CONFIGS])
def test_peak_prediction_matches_the_tensors_a_step_holds(bases, config, precision):
    torch.manual_seed(0)
    vlm = config["kind"] == "vlm"
    plan = build_plan(copy.deepcopy(bases[config["kind"]]), {**config["strategy"], "lora_dropout": 0.0})
    plan.apply(config["epoch"])
    model = plan.model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    apply_precision_policy(model, [n for n, p in model.named_parameters() if p.requires_grad], precision)
    optimizer = torch.optim.AdamW(plan.param_groups())
    batch = make_batch(BATCH, LENGTH, vlm=vlm, vocab=SIZE.vocab)
    cpu = torch.device("cpu")
    train_step(model, [batch], optimizer, trainable=trainable, device=cpu, precision=precision)  # AdamW state

    live = LiveTensors()
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    live.hold([*model.parameters(), *model.buffers(), *(p.grad for p in trainable if p.grad is not None), *state])
    with live:
        train_step(model, [batch], optimizer, trainable=trainable, device=cpu, precision=precision)
    measured = live.peak + sum(t.numel() * t.element_size() for t in state)

    memory = plan.summary(epoch=config["epoch"], precision=precision, batch=BATCH, length=LENGTH)["memory"]
    predicted = memory["peak_bytes"] - memory["weights_bytes"]
    ratio = predicted / measured
    assert abs(ratio - 1) <= TOLERANCE, (
        f"{config['id']} {precision}: predicted {predicted / 2**20:.1f} MiB above the weights, the step held "
        f"{measured / 2**20:.1f} MiB ({ratio:.2f}x); activations {memory['activations']}")
