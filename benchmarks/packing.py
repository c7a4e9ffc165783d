"""(9) Sequence packing: tokens/s of training on packed rows / on padded batches, same model, same examples.

Text examples of mixed lengths (token counts drawn uniformly from 16..max_length, loss on every token, a seeded
draw) are trained on two ways with the same batch size (``train.batch_size`` rows of at most ``max_length``
tokens), as a run with ``train.packing`` off or on would:

- padding: batches of examples in a fixed shuffled order, ``dataset.collate`` pads each to its longest;
- packing: ``pipelines.data.packing.pack`` (best-fit decreasing) rows, collated the same way; the loop's
  ``step.forward`` calls the model on ``packed_batch`` (the 4-D block-diagonal mask; built inside the timed step).

Two copies of one Llama-style model (same init, full fine-tuning, AdamW), one per way. A round is one epoch of
each over the same examples (``pipelines.training.step.train_step``, the loop's own step; collate outside the
clock), in alternating order; one warm-up round is not counted. Tokens/s = non-padding tokens / summed
train_step seconds of the epoch. Target: median over rounds of (packing tokens/s / padding tokens/s in the same
round) >= 1.3. Also reported: how full the batches are (real tokens / batch slots) either way, and that both
ways give the same summed loss on the same (untrained) model.
"""

from __future__ import annotations

import time

from benchmarks.common import Check, ModelSize, figure, log, median

NAME = "packing"
TARGET = 1.3  # packing tokens/s / padding tokens/s


def settings(quick: bool) -> dict:
    size = ModelSize(hidden=64, layers=2, intermediate=176, heads=4, kv_heads=2) if quick else \
        ModelSize(hidden=192, layers=4, intermediate=512, heads=4, kv_heads=2)
    return {"size": size, "max_length": 128 if quick else 256, "examples": 64 if quick else 96,
            "min_length": 16, "batch": 8, "rounds": 5 if quick else 7, "threads": 1, "seed": 0}


def make_examples(n: int, min_length: int, max_length: int, vocab: int, seed: int) -> list[dict]:
    """``n`` text examples, lengths uniform in [min_length, max_length], loss on every token."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_length, max_length + 1, (n,), generator=g).tolist()
    out = []
    for n_tokens in lengths:
        ids = torch.randint(3, vocab - 8, (n_tokens,), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def batches(rows, batch: int) -> list[dict]:
    from pipelines.data.dataset import collate  # lazy: torch; `freezetune --help` loads this module

    rows = list(rows)
    return [collate(rows[i:i + batch], pad_token_id=0) for i in range(0, len(rows), batch)]


def _epoch(net, params, optimizer, data: list[dict], device) -> tuple[float, int]:
    from pipelines.training.step import train_step  # lazy: torch; `freezetune --help` loads this module

    seconds, tokens = 0.0, 0
    for batch in data:
        started = time.perf_counter()
        done = train_step(net, [batch], optimizer, trainable=params, device=device, max_grad_norm=1.0)
        seconds += time.perf_counter() - started
        tokens += done.input_tokens
    return seconds, tokens


def same_loss(model, padded: list[dict], packed: list[dict], attn: str) -> dict:
    """The summed loss of every example, batched both ways, on the same untrained model."""
    import torch

    from pipelines.data.packing import packed_batch  # lazy: torch; `freezetune --help` loads this module
    from pipelines.training.step import summed_loss  # lazy: torch; `freezetune --help` loads this module

    with torch.no_grad():
        pad = sum(float(summed_loss(model(**{k: v for k, v in b.items() if k != "labels"}).logits, b["labels"]))
                  for b in padded)
        pack = 0.0
        for b in packed:
            inputs = packed_batch(b, attn)
            labels = inputs.pop("labels")
            pack += float(summed_loss(model(**inputs).logits, labels))
    return {"padding_loss_sum": pad, "packing_loss_sum": pack, "rel_diff": abs(pack - pad) / abs(pad),
            "same": abs(pack - pad) <= 1e-5 * abs(pad)}


def measure(p: dict) -> dict:
    import torch

    from pipelines.data.packing import attention_implementation, fill, pack  # lazy: torch, as above

    torch.set_num_threads(p["threads"])
    device = torch.device("cpu")
    size = p["size"]
    data = make_examples(p["examples"], p["min_length"], p["max_length"], size.vocab, p["seed"])
    lengths = [len(ex["input_ids"]) for ex in data]
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(p["seed"] + 1)).tolist()
    padded = batches([data[i] for i in order], p["batch"])
    rows = pack(data, p["max_length"], lengths=lengths)
    packed = batches(rows, p["batch"])
    slots = {"padding": sum(b["input_ids"].numel() for b in padded),
             "packing": sum(b["input_ids"].numel() for b in packed)}
    runs = {}
    for mode in ("padding", "packing"):
        model = size.build(vlm=False, seed=0)
        attn = attention_implementation(model, p["max_length"])
        params = list(model.parameters())
        net = model  # train_step's forward builds the packed mask itself (a batch with position_ids)
        runs[mode] = (net, params, torch.optim.AdamW(params, lr=1e-4), padded if mode == "padding" else packed)
    check = same_loss(runs["padding"][0], padded, packed, attn)
    per = {"padding": [], "packing": []}
    for r in range(1 + p["rounds"]):
        for mode in (("padding", "packing") if r % 2 == 0 else ("packing", "padding")):
            net, params, optimizer, batches_ = runs[mode]
            seconds, tokens = _epoch(net, params, optimizer, batches_, device)
            if r:  # round 0 warms up
                per[mode].append(tokens / seconds)
        if r:
            log(f"packing: round {r}/{p['rounds']}: padding {per['padding'][-1]:,.0f} tok/s, packing "
                f"{per['packing'][-1]:,.0f} tok/s ({per['packing'][-1] / per['padding'][-1]:.2f}x)")
        else:
            log("packing: warm-up round done")
    return {"tokens_per_s": per, "ratios": [k / d for k, d in zip(per["packing"], per["padding"])],
            "tokens": sum(lengths), "slots": slots, "steps": {"padding": len(padded), "packing": len(packed)},
            "rows": len(rows), "row_fill": fill(rows, lengths, p["max_length"]), "same_loss": check,
            "attn": attn, "params": sum(q.numel() for q in runs["padding"][1])}


def run(ctx) -> list:
    p = settings(ctx.quick)
    size = p["size"]
    log(f"packing: Llama {size.layers}x{size.hidden}, {p['examples']} examples of {p['min_length']}.."
        f"{p['max_length']} tokens, batch {p['batch']}, {p['rounds']} rounds, {p['threads']} thread(s)")
    got = measure(p)
    ctx.raw[NAME] = {"settings": {**p, "size": vars(size)}, **got}
    tokens, slots, steps = got["tokens"], got["slots"], got["steps"]
    where = (f"full fine-tuning of a {got['params'] / 1e6:.1f}M-parameter Llama ({size.layers} blocks x "
             f"{size.hidden}, {got['attn']} attention), fp32, cpu, {p['threads']} thread; {p['examples']} examples "
             f"({tokens:,} tokens) of {p['min_length']}..{p['max_length']} tokens (uniform, seeded), batch "
             f"{p['batch']} rows either way: {steps['padding']} padded batches vs {steps['packing']} batches of "
             f"{got['rows']} packed rows per epoch")
    ratio_how = (f"non-padding tokens / summed train_step seconds over one epoch each way, in alternating order, "
                 f"after one warm-up round; median over {len(got['ratios'])} rounds of (packing / padding) in the "
                 f"same round; {where}")
    check = got["same_loss"]
    return [
        figure(f"{NAME}.tokens_per_s_ratio", "tokens/s: packing / padding (mixed lengths)", median(got["ratios"]),
               "x", ratio_how, Check(">=", TARGET), repeats=len(got["ratios"]),
               details={"ratios": got["ratios"], "steps": steps}),
        figure(f"{NAME}.padding_tokens_per_s", "tokens/s, padded batches", median(got["tokens_per_s"]["padding"]),
               "tok/s", f"median over rounds; {where}", repeats=len(got["ratios"]),
               details={"per_round": got["tokens_per_s"]["padding"]}),
        figure(f"{NAME}.packing_tokens_per_s", "tokens/s, packed rows", median(got["tokens_per_s"]["packing"]),
               "tok/s", f"median over rounds; {where}", repeats=len(got["ratios"]),
               details={"per_round": got["tokens_per_s"]["packing"]}),
        figure(f"{NAME}.batch_fill", "real tokens / batch slots: packing (padding in details)",
               tokens / slots["packing"], "", f"non-padding tokens / (rows x padded length) summed over the "
               f"epoch's batches; padding: {tokens / slots['padding']:.3f}; packed rows alone (x max_length): "
               f"{got['row_fill']:.3f}; {where}", repeats=1,
               details={"padding": tokens / slots["padding"], "packing": tokens / slots["packing"],
                        "rows_of_max_length": got["row_fill"]}),
        figure(f"{NAME}.same_loss", "packed = padded: summed loss of every example (rel 1e-5), same model",
               check["same"], "", "the untrained model's summed token loss (pipelines.training.step.summed_loss) "
               "over all examples, batched padded and packed", Check("==", True), target="yes", repeats=1,
               details=check, note=None if check["same"] else f"relative difference {check['rel_diff']:.3g}"),
    ]
