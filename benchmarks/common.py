"""What every benchmark shares: figures and verdicts, logging, the machine line, models, batches, one step.

A *figure* is one measured number with its unit, its target (when the issue sets one), how it was measured
and a verdict: ``pass`` / ``fail`` when the target applies and was checked, ``na`` when there is no target
or it cannot be checked here (no GPU, a reported-only breakdown line). The runner writes them to
``bench.json`` and ``bench.md``.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.jobs.ray_env import connect

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress goes to stderr (stdout is left for the final table)."""
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def median(xs) -> float:
    xs = [float(x) for x in xs]
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------------------------------- figures


@dataclass
class Check:
    """A target: ``op`` is ``<=``, ``>=``, ``==`` or ``within`` (|value/ref - 1| <= tol)."""

    op: str
    ref: float
    tol: float = 0.0

    def holds(self, value: float) -> bool:
        if self.op == "<=":
            return value <= self.ref
        if self.op == ">=":
            return value >= self.ref
        if self.op == "==":
            return value == self.ref
        if self.op == "within":
            return self.ref != 0 and abs(value / self.ref - 1) <= self.tol
        raise ValueError(self.op)

    def text(self, unit: str) -> str:
        u = _unit(unit)
        if self.op == "within":
            return f"within {self.tol:.0%} of {self.ref:.3g}{u} (theory)"
        return {"<=": "≤", ">=": "≥", "==": "="}[self.op] + f" {_num(self.ref)}{u}"


def _unit(unit: str) -> str:
    return {"x": "×", "s": " s", "MiB": " MiB", "B": " B", "": ""}.get(unit, f" {unit}")


def _num(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


@dataclass
class Figure:
    id: str  # stable, dotted: benchmark.thing.measure
    benchmark: str
    label: str
    value: Any  # a number, or None when not measured (na)
    unit: str
    target: str  # human text of the target, "—" when the issue sets none
    verdict: str  # pass | fail | na
    how: str  # how it was measured
    repeats: int | None = None
    note: str | None = None  # why a target was missed / does not apply
    check: dict | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def shown(self) -> str:
        if self.value is None:
            return "—"
        if isinstance(self.value, bool):
            return "yes" if self.value else "no"
        if self.unit == "x" and isinstance(self.value, float) and abs(self.value) < 10:
            return f"{self.value:.3f}×"  # ratios sit next to targets like 1.03: one more digit than .3g
        return _num(self.value) + _unit(self.unit)


def figure(id: str, label: str, value: Any, unit: str, how: str, check: Check | None = None, *,
           target: str | None = None, repeats: int | None = None, note: str | None = None,
           applies: bool = True, details: dict | None = None) -> Figure:
    """One figure; the verdict comes from ``check`` (na without one, when it does not apply, or no value)."""
    if check is not None and applies and value is not None and not (isinstance(value, float) and value != value):
        verdict = "pass" if check.holds(value) else "fail"
    else:
        verdict = "na"
    text = target if target is not None else (check.text(unit) if check is not None else "—")
    return Figure(id=id, benchmark=id.split(".", 1)[0], label=label, value=value, unit=unit, target=text,
                  verdict=verdict, how=how, repeats=repeats, note=note,
                  check=asdict(check) if check is not None else None, details=details or {})


# ---------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001
        return "?"


def machine_info() -> dict:
    info = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "memory_gib": None,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "torch": _version("torch"), "transformers": _version("transformers"), "peft": _version("peft"),
        "ray": _version("ray"), "mlflow": _version("mlflow"),
        "gpu": None,
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except Exception:  # noqa: BLE001
        pass
    return info


def machine_line(info: dict) -> str:
    load = info.get("load_average_at_start")
    return (f"{info['cpu']}, {info['usable_cpus']} usable of {info['logical_cpus']} logical CPUs, "
            f"{info['memory_gib']} GiB RAM, GPU: {info['gpu'] or 'none'}; Python {info['python']}, "
            f"torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}, ray {info['ray']}, "
            f"mlflow {info['mlflow']}" + (f"; load average at start {load[0]} (1 min)" if load else ""))


# ---------------------------------------------------------------------------------------- memory (Linux)


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS since the last ``reset_peak_rss``) in MiB, from /proc/self/status."""
    rss = hwm = float("nan")
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return rss, hwm


def reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def exact_malloc() -> bool:
    """glibc: hand every allocation >= 64 KiB straight to mmap and back on free, so RSS follows live tensors
    (otherwise freed memory stays in the heap and a later peak hides inside it)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 64 * 1024)) and bool(libc.mallopt(-1, 0))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def trim_heap() -> None:
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------- models and batches
VOCAB = 384  # the byte tokenizer's vocabulary (pipelines.presets.VOCAB_SIZE)
IMAGE_TOKENS = 17  # tiny-llava: (32/8)**2 patches + CLS


@dataclass(frozen=True)
class ModelSize:
    """A Llama-style language model (and, for a VLM, tiny-llava's small CLIP tower in front of it)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int = VOCAB

    def text_config(self):
        import transformers as tf

        return tf.LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                              num_hidden_layers=self.layers, num_attention_heads=self.heads,
                              num_key_value_heads=self.kv_heads, max_position_embeddings=512,
                              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)

    def llava_config(self):
        import transformers as tf

        from pipelines.models import presets  # lazy: transformers; `freezetune --help` loads this module

        base = presets.tiny_llava()
        return tf.LlavaConfig(vision_config=base.vision_config, text_config=self.text_config(),
                              image_token_index=self.vocab - 1, vision_feature_layer=-1,
                              vision_feature_select_strategy="full", image_seq_length=IMAGE_TOKENS,
                              tie_word_embeddings=False)

    def build(self, vlm: bool, seed: int = 0):
        import torch
        import transformers as tf

        torch.manual_seed(seed)
        if vlm:
            return tf.LlavaForConditionalGeneration(self.llava_config())
        return tf.LlamaForCausalLM(self.text_config())


def make_batch(batch_size: int, seq_len: int, vlm: bool, seed: int = 0, vocab: int = VOCAB) -> dict:
    """A fixed synthetic batch: random tokens, loss on every text token; a VLM row starts with its image slots."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab - 8, (batch_size, seq_len), generator=g)
    labels = ids.clone()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if vlm:
        ids[:, :IMAGE_TOKENS] = vocab - 1
        labels[:, :IMAGE_TOKENS] = -100
        batch["pixel_values"] = torch.randn(batch_size, 3, 32, 32, generator=g)
    batch["labels"] = labels
    return batch


def start_ray(verbose: bool = False, num_cpus: int = 2) -> None:
    """A local instance as freezetune starts one (pipelines.ray_env.connect: every process is told where its
    own State API is, which Train's placement-group cleaner needs when another Ray runs on the machine), with
    the workers' output kept out of the benchmark's stderr unless --verbose."""
    connect(num_cpus=num_cpus, quiet=not verbose)
