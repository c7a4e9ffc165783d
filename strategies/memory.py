"""Training memory per rank (weights, gradients, AdamW state), before activations, under the precision policy.

The policy (``pipelines.training.precision`` applies it; the loop reports what the rank then holds):
- a parameter that trains at some point of the run is kept in fp32: 4 B weight, 4 B gradient while it
  trains, 8 B AdamW state (exp_avg, exp_avg_sq) once it has trained, plus a 4 B ``step`` per tensor;
- a frozen parameter is kept in the compute dtype: 2 B in bf16/fp16, 4 B in fp32; no gradient, no state.
So a trainable parameter costs 16 B in every precision (SPEC's 2 + 2 + 12, held as 4 + 4 + 8), and a
frozen 7B language model 14 GB in bf16. Under FSDP with N ranks (``shards``) each rank holds 1/N of each
figure (dim 0 of every tensor split N ways); activations are not sharded.
"""

from __future__ import annotations

from typing import Iterable, Mapping

FROZEN_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}  # per frozen parameter, in the compute dtype
TRAINABLE_WEIGHT, GRAD, ADAM_STATE, ADAM_STEP = 4, 4, 8, 4  # fp32 weight, grad, exp_avg + exp_avg_sq; step/tensor
LOSS_CHUNK_ELEMENTS = 2**24  # the chunked loss's fp32 chunk (pipelines.training.step.CHUNK_ELEMENTS)
DROPOUT_MASK_BYTES = {"cuda": 1, "cpu": 4}  # per dropout value, autograd keeps a bool mask (CUDA) or a float one


def estimate_memory(numel: Mapping[str, int], trainable: Iterable[str], ever_trainable: Iterable[str],
                    precision: str = "bf16", shards: int = 1) -> dict:
    """Bytes one rank holds while ``trainable`` (the current stage) trains, for a run whose optimizer will
    hold ``ever_trainable``; ``numel`` maps every parameter (each shared tensor once) to its size.

    ``optimizer_bytes`` is the state after the stage's first step: every parameter trained so far (stages
    only add parameters, so that is ``trainable``)."""
    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards = {shards!r}: the number of FSDP ranks, an integer >= 1")
    if precision not in FROZEN_BYTES:
        raise ValueError(f"precision = {precision!r}: use one of {', '.join(FROZEN_BYTES)}")
    trainable, ever = set(trainable), set(ever_trainable)
    n_trainable = sum(numel[n] for n in trainable)
    n_ever = sum(numel[n] for n in ever)
    n_frozen = sum(numel.values()) - n_ever
    out = {
        "precision": precision,
        "shards": shards,
        "weights_bytes": -(-(TRAINABLE_WEIGHT * n_ever + FROZEN_BYTES[precision] * n_frozen) // shards),
        "grads_bytes": -(-GRAD * n_trainable // shards),
        # AdamW's step counter is one scalar per tensor on every rank
        "optimizer_bytes": -(-ADAM_STATE * n_trainable // shards) + ADAM_STEP * len(trainable),
    }
    out["total_bytes"] = out["weights_bytes"] + out["grads_bytes"] + out["optimizer_bytes"]
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def estimate_activations(*, batch: int, length: int, hidden: int, intermediate: int, vocab: int, blocks: int,
                         stored_blocks: int, trainable_blocks: int | None = None, precision: str = "bf16",
                         checkpointing: bool = False, vision: dict | None = None, kv_hidden: int | None = None,
                         lora_inputs: int = 0, dropout_mask_bytes: int = 0, copied_weights: int = 0,
                         adapter_blocks: int = 0) -> dict:
    """Activation bytes kept for backward in one micro-batch, and a block's forward working set.

    Only blocks at or above the lowest block that needs a gradient (``stored_blocks``, of which
    ``trainable_blocks`` train; default all) keep anything: autograd never enters frozen lower blocks. A
    frozen block that autograd only passes through (a trainable part lies below it) keeps none of its linear
    layers' inputs (a frozen weight needs no input to pass a gradient on). Per token, under SDPA/flash
    attention (no s x s scores kept), with e = 2 (bf16/fp16) or 4 (fp32) and ``kv_hidden`` the width of k and v:

    - fp32: a trained block ``e * (9 h + 4 i) + 8 h`` (norm inputs/outputs, q, k, v, attention output,
      residuals; gate, up, act and their product), a pass-through one ``e * (4 h + 3 i) + 8 h`` (measured
      on CPU: `freezetune bench --only freeze`, within 4%).
    - bf16/fp16 autocast: the residual stream and the RMSNorms stay fp32 and autocast casts a norm's output
      once per linear layer that reads it (not cached: it is not a weight), so a trained block keeps
      ``e * (4 i + 7 h + 2 kv) + 16 h`` (5 casts, q, attention output, k, v; fp32 norm inputs and normed
      values) and a pass-through one ``e * (3 i + 2 h + 2 kv) + 8 h``. Autograd also keeps the bf16 copy of
      every trained weight whose input needs a gradient (``copied_weights`` parameters, ``e`` bytes each).

    A block that trains only through LoRA adapters (``adapter_blocks`` of the ``trainable_blocks``) keeps what
    a pass-through block keeps plus, per input value of each targeted layer (``lora_inputs``: the summed input
    widths of the targeted layers in stored blocks), what the adapter saves: under autocast the input's cast
    (``e``); in fp32 nothing (the adapter shares its input with the frozen layer) or, with LoRA dropout, the
    dropout's output; and with dropout its mask (``dropout_mask_bytes``: 0 without dropout, else
    ``DROPOUT_MASK_BYTES`` of the device). Counted tensor by tensor under CPU autocast and fp32
    (tests/strategies/test_peak_prediction.py).

    With activation checkpointing a block keeps only its input (``e * h`` per token) and one block is
    recomputed at a time. The chunked loss keeps the logits and, in backward, their gradient
    (``2 e * vocab`` per token) plus one fp32 chunk of ``LOSS_CHUNK_ELEMENTS`` (and, under autocast, the
    chunk's low-precision copy it is cast from). A block's forward allocates about what a trainable block
    keeps, ``e * (9 h + 4 i)`` per token, even when it keeps nothing (``transient_bytes``: the peak of a run
    that stores little). ``vision``: {tokens, hidden, intermediate, stored_blocks} when vision blocks train.
    """
    e = FROZEN_BYTES[precision]
    autocast = e < 4
    tokens = batch * length
    trainable_blocks = stored_blocks if trainable_blocks is None else trainable_blocks

    def stack(n_tokens: int, h: int, i: int, stored: int, passing: int = 0, kv: int | None = None) -> int:
        kv = h if kv is None else kv
        if autocast:
            full = n_tokens * (e * (4 * i + 7 * h + 2 * kv) + 16 * h)
            through = n_tokens * (e * (3 * i + 2 * h + 2 * kv) + 8 * h)
        else:
            full = n_tokens * (e * (9 * h + 4 * i) + 8 * h)
            through = n_tokens * (e * (4 * h + 3 * i) + 8 * h)
        if not checkpointing:
            return (stored - passing) * full + passing * through
        return stored * n_tokens * e * h + (full if stored else 0)  # inputs kept + one block recomputed

    passing = stored_blocks - trainable_blocks + adapter_blocks
    language = stack(tokens, hidden, intermediate, stored_blocks, passing, kv_hidden)
    # an adapter saves its input's cast (autocast) or the dropout's fp32 output, and the dropout's mask
    per_lora_input = (e if autocast else (4 if dropout_mask_bytes else 0)) + dropout_mask_bytes
    vision_bytes = 0
    if vision:
        vision_bytes = stack(batch * vision["tokens"], vision["hidden"], vision["intermediate"],
                             vision["stored_blocks"])
    chunk = min(LOSS_CHUNK_ELEMENTS, tokens * vocab)
    logits = 2 * tokens * e * vocab + (4 + (e if autocast else 0)) * chunk
    copies = tokens * lora_inputs * per_lora_input + (e * copied_weights if autocast else 0)
    return {"activations_bytes": language + vision_bytes + logits + copies, "batch": batch, "length": length,
            "checkpointing": checkpointing, "language_bytes": language, "vision_bytes": vision_bytes,
            "logits_bytes": logits, "copies_bytes": copies,  # trained weights' casts, adapters' saved inputs
            "blocks_kept": stored_blocks, "blocks_trained": trainable_blocks, "blocks": blocks,
            "transient_bytes": tokens * e * (9 * hidden + 4 * intermediate)}


def estimate_peak(memory: dict, activations: dict) -> int:
    """The peak bytes of one rank over a training step (``memory``: ``estimate_memory``'s, per rank).

    Weights and AdamW state stay; on top of them the step's peak is the largest of: the activations kept at the
    start of backward (gradients then appear as activations go, block by block), a block's forward working set
    (``transient_bytes``), and at the optimizer step the gradients plus AdamW's one temporary per trainable value
    (its foreach ``sqrt(exp_avg_sq)``). Within 4% of the live tensors of a real step for every strategy, in bf16
    autocast and fp32 (tests/strategies/test_peak_prediction.py), and of the RSS peak in fp32 on CPU
    (`freezetune bench --only freeze`; the sum of all four, which sizing used before, overshot by up to 54%)."""
    on_top = max(activations["activations_bytes"], activations["transient_bytes"], 2 * memory["grads_bytes"])
    return memory["weights_bytes"] + memory["optimizer_bytes"] + on_top
