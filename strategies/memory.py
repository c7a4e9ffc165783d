"""Training memory estimate (weights, gradients, AdamW state), before activations.

Mixed precision (bf16/fp16) AdamW: 2 B weights + 2 B grads + 12 B optimizer
(fp32 master copy, m, v) = 16 B per trainable parameter, 2 B per frozen one.
fp32: 4 B weights + 4 B grads + 8 B (m, v) per trainable, 4 B per frozen.
"""

from __future__ import annotations

BYTES = {  # precision: (weight, grad, optimizer) bytes per parameter
    "bf16": (2, 2, 12),
    "fp16": (2, 2, 12),
    "fp32": (4, 4, 8),
}


def estimate_memory(total_params: int, trainable_params: int, precision: str = "bf16") -> dict:
    if precision not in BYTES:
        raise ValueError(f"precision = {precision!r}: use one of {', '.join(BYTES)}")
    weight, grad, optim = BYTES[precision]
    out = {
        "precision": precision,
        "weights_bytes": weight * total_params,
        "gradients_bytes": grad * trainable_params,
        "optimizer_bytes": optim * trainable_params,
    }
    out["total_bytes"] = out["weights_bytes"] + out["gradients_bytes"] + out["optimizer_bytes"]
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
