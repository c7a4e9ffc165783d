"""(7) Loss memory: the chunked token loss's peak memory / the fp32-everything loss's, same logits, same run.

The loss step alone — ``token_loss_sum`` forward + backward to the logits — on fixed bf16 logits (a leaf tensor
created before the measurement, as a model's lm_head leaves them) of a causal-LM batch: full mode 4 x 512 tokens
x a 32,000 vocabulary (Llama 2's), quick 2 x 512 x 32,000. Two losses, the same value:

- the reference: the formula ``token_loss_sum`` had before issue 13, ``F.cross_entropy`` over
  ``logits[:, :-1].reshape(-1, V).float()`` — an fp32 copy of every logit, whose log-softmax (fp32 again) autograd
  keeps for backward;
- the chunked one: ``pipelines.training.step.token_loss_sum`` as shipped (labelled rows only, one fp32 chunk at
  a time, softmax recomputed per chunk in backward; default chunk rows for the vocabulary).

Memory: in the benchmark's own fresh process, with glibc told to mmap every allocation >= 64 KiB (so RSS follows
live tensors), the peak RSS (VmHWM, reset just before) of one forward + backward minus the RSS just before it; the
logits' gradient (bf16, the size of the logits) is part of both. R rounds, each measuring both losses in
alternating order; medians over rounds. Time: the same calls' wall time, median over rounds of the per-round ratio
(informational: 1 thread, a shared machine). A second case (quick: one round) has a prompt/completion batch (the
first half of every row labelled -100), where the chunked loss skips the prompt rows. The two losses' values and
gradients are checked equal (bf16 rounding) on a backward of the summed loss.
"""

from __future__ import annotations

import time

from benchmarks.common import Check, exact_malloc, figure, log, median, reset_peak_rss, rss_mib, trim_heap
from pipelines.data.dataset import IGNORE_INDEX
from pipelines.training.step import chunk_rows, token_loss_sum

NAME = "loss_memory"
TARGET = 0.5  # chunked peak / reference peak


def reference_loss_sum(logits, labels):
    """The loss before issue 13: cross-entropy over an fp32 copy of every shifted logit."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def settings(quick: bool) -> dict:
    return {"batch": 2 if quick else 4, "seq_len": 512, "vocab": 32000, "rounds": 2 if quick else 5,
            "prompt_rounds": 1 if quick else 5, "threads": 1}


def make_inputs(batch: int, seq_len: int, vocab: int, seed: int = 0):
    """bf16 logits (a leaf that requires grad) and labels with every token labelled."""
    import torch

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq_len, vocab, generator=g, dtype=torch.bfloat16).mul_(2).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq_len), generator=g)
    return logits, labels


def prompt_labels(labels):
    """The same labels as a prompt/completion batch: the first half of every row is -100."""
    labels = labels.clone()
    labels[:, : labels.size(1) // 2] = IGNORE_INDEX
    return labels


def _one(fn, logits, labels, divisor: int) -> tuple[float, float]:
    """(peak RSS above the level before, seconds) of one loss forward + backward to ``logits``."""
    logits.grad = None
    trim_heap()
    reset_peak_rss()
    before = rss_mib()[0]
    t0 = time.perf_counter()
    loss = fn(logits, labels)
    (loss / divisor).backward()
    seconds = time.perf_counter() - t0
    peak = rss_mib()[1] - before
    del loss
    logits.grad = None
    return peak, seconds


def measure(logits, labels, rounds: int, prompt: bool) -> dict:
    divisor = max(int((labels[:, 1:] != IGNORE_INDEX).sum()), 1)
    losses = {"reference": reference_loss_sum, "chunked": token_loss_sum}
    peaks = {k: [] for k in losses}
    times = {k: [] for k in losses}
    _one(token_loss_sum, logits[:1, :8], labels[:1, :8], 1)  # first calls of each op are not what we measure
    for r in range(rounds):
        order = list(losses) if r % 2 == 0 else list(losses)[::-1]
        for name in order:
            peak, seconds = _one(losses[name], logits, labels, divisor)
            peaks[name].append(peak)
            times[name].append(seconds)
        log(f"loss_memory: {'prompt/completion' if prompt else 'every token labelled'}, round {r + 1}/{rounds}: "
            f"reference +{peaks['reference'][-1]:.0f} MiB {times['reference'][-1]:.2f} s, "
            f"chunked +{peaks['chunked'][-1]:.0f} MiB {times['chunked'][-1]:.2f} s")
    return {"logits_mib": logits.numel() * logits.element_size() / 2**20, "labelled": divisor,
            "rows": labels.size(0) * (labels.size(1) - 1), "peaks_mib": peaks, "times_s": times,
            "peak_ratio": median(peaks["chunked"]) / median(peaks["reference"]),
            "time_ratio": median([c / r for c, r in zip(times["chunked"], times["reference"])])}


def same_result(logits, labels) -> dict:
    """Both losses' value and gradient on one batch (backward of the summed loss)."""
    out = {}
    for name, fn in (("reference", reference_loss_sum), ("chunked", token_loss_sum)):
        logits.grad = None
        loss = fn(logits, labels)
        loss.backward()
        out[name] = (float(loss.detach()), logits.grad.float())
    (ref, g_ref), (got, g_got) = out["reference"], out["chunked"]
    scale = float(g_ref.abs().max())
    grad_diff = float((g_got - g_ref).abs().max())
    # bf16 gradients: equal up to one rounding of the fp32 value (2^-8 relative), plus fp32 noise
    grad_ok = bool(((g_got - g_ref).abs() <= 2**-7 * g_ref.abs() + 1e-3 * scale).all())
    return {"reference_loss": ref, "chunked_loss": got, "loss_rel_diff": abs(got - ref) / abs(ref),
            "grad_max_abs_diff": grad_diff, "grad_max_abs": scale, "grad_ok": grad_ok,
            "same": abs(got - ref) <= 1e-5 * abs(ref) and grad_ok}


def run(ctx) -> list:
    import torch

    p = settings(ctx.quick)
    exact = exact_malloc()
    torch.set_num_threads(p["threads"])
    b, t, v, rounds = p["batch"], p["seq_len"], p["vocab"], p["rounds"]
    chunk = chunk_rows(v)
    log(f"loss_memory: bf16 logits {b}x{t}x{v}, chunks of {chunk} rows, {rounds} rounds, "
        f"{torch.get_num_threads()} thread(s)")
    logits, labels = make_inputs(b, t, v)
    full = measure(logits, labels, rounds, prompt=False)
    prompt = measure(logits, prompt_labels(labels), p["prompt_rounds"], prompt=True)
    # part of one row as a fresh leaf, prompt/completion labels: values and gradients
    check = same_result(logits[:1, :256].detach().clone().requires_grad_(), prompt_labels(labels[:1, :256]))
    del logits
    ctx.raw[NAME] = {"settings": p, "chunk_rows": chunk, "exact_malloc": exact, "all_labelled": full,
                     "prompt_completion": prompt, "same_result": check}
    where = (f"bf16 logits {b}x{t}x{v:,} ({full['logits_mib']:.0f} MiB, a leaf that requires grad), "
             f"{chunk} rows per chunk (pipelines.training.step.chunk_rows), {torch.get_num_threads()} thread, cpu")
    mem_how = ("peak RSS (VmHWM, reset just before) of one loss forward + backward to the logits minus the RSS "
               "before it (the logits exist already; their bf16 gradient counts), in a fresh process with glibc "
               f"mmapping every allocation >= 64 KiB; median over {rounds} rounds, both losses each round in "
               f"alternating order; {where}")
    time_how = (f"wall time of the same forward + backward calls: median over {rounds} rounds of (chunked / "
                f"reference) in the same round; informational (a shared machine); {where}")
    pr = p["prompt_rounds"]
    prompt_mem_how, prompt_time_how = (h.replace(f"over {rounds} rounds", f"over {pr} round{'s' * (pr > 1)}")
                                       for h in (mem_how, time_how))
    note = None if exact else "glibc's mallopt was not available: RSS may not follow freed tensors"
    ref_mib, got_mib = median(full["peaks_mib"]["reference"]), median(full["peaks_mib"]["chunked"])
    n_ref = full["rows"]
    figs = [
        figure(f"{NAME}.reference_peak_mib", "loss step, today's formula (fp32 copy of every logit): peak memory "
               "above the logits", ref_mib, "MiB", mem_how, repeats=rounds, note=note,
               details={"per_round": full["peaks_mib"]["reference"]}),
        figure(f"{NAME}.chunked_peak_mib", "loss step, chunked token_loss_sum: peak memory above the logits",
               got_mib, "MiB", mem_how, repeats=rounds, note=note,
               details={"per_round": full["peaks_mib"]["chunked"], "chunk_rows": chunk,
                        "chunks": -(-n_ref // chunk)}),
        figure(f"{NAME}.peak_ratio", "loss step peak memory: chunked / today's formula", full["peak_ratio"], "x",
               mem_how, Check("<=", TARGET), repeats=rounds, note=note,
               details={"reference_mib": ref_mib, "chunked_mib": got_mib, "logits_mib": full["logits_mib"]}),
        figure(f"{NAME}.time_ratio", "loss step time: chunked / today's formula", full["time_ratio"], "x",
               time_how, repeats=rounds, details={"times_s": full["times_s"]}),
        figure(f"{NAME}.prompt.peak_ratio", "loss step peak memory, prompt/completion batch (half the rows -100): "
               "chunked / today's formula", prompt["peak_ratio"], "x", prompt_mem_how, repeats=pr, note=note,
               details={"peaks_mib": prompt["peaks_mib"], "labelled": prompt["labelled"], "rows": prompt["rows"]}),
        figure(f"{NAME}.prompt.time_ratio", "loss step time, prompt/completion batch (half the rows -100): "
               "chunked / today's formula", prompt["time_ratio"], "x", prompt_time_how, repeats=pr,
               details={"times_s": prompt["times_s"]}),
        figure(f"{NAME}.same_result", "chunked loss = today's formula: value (rel 1e-5) and bf16 logit gradient",
               check["same"], "", "the first 256 positions of the first row of the same logits as a fresh leaf, "
               "prompt/completion labels (first half -100), backward of the summed loss; gradients equal within one "
               "bf16 rounding (2^-7 relative) + 1e-3 x the largest", Check("==", True),
               target="yes", repeats=1, details=check,
               note=None if check["same"] else f"loss {check['chunked_loss']} vs {check['reference_loss']}, "
               f"max |grad diff| {check['grad_max_abs_diff']:.3g} of max |grad| {check['grad_max_abs']:.3g}"),
    ]
    return figs
