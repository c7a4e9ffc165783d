"""freezetune benchmarks: the cost of Ray, the savings of freezing, the cost of a trial, measured against targets.

    python -m benchmarks                      # every benchmark, ~40 minutes on 2 CPU cores
    python -m benchmarks --quick              # CI: small models, fewer repeats (~3 minutes); checks the format
    python -m benchmarks --only freeze data_cache --out bench-results

Writes ``OUT/bench.json`` (every figure: value, unit, target, verdict, how measured, repeats, details) and
``OUT/bench.md`` (the table for the README, with the machine it came from). Progress goes to stderr.

Benchmarks (one module each):

1. ``ray_overhead``  — steady-state step time in a 1-worker Ray Train TorchTrainer vs the same function in
   plain PyTorch (same model, batch, threads). Target <= 1.03x.
2. ``freeze``        — step time, peak memory and optimizer state of each freeze strategy vs full, next to the
   theoretical FLOP ratio counted from the autograd graph. Target: within 10% of theory; AdamW state exactly
   8 B per trainable fp32 parameter.
3. ``trial_cost``    — a trial's wall time minus the time inside the training loop, broken down (Ray Train
   start, imports, model, data, set-up, teardown). Target <= 8 s.
4. ``early_stopping``— the demo sweep with ASHA vs FIFO: wall-time ratio (target <= 0.5) and the best trial.
5. ``data_cache``    — second data preparation / first (target <= 0.05).
6. ``gpu``           — tokens/s and MFU of full fine-tuning a ~0.5B model in bf16, and the freeze ratios on GPU;
   only where CUDA is available (otherwise reported as skipped).
7. ``loss_memory``   — peak memory of the loss step (token loss forward + backward to bf16 logits): the chunked
   ``token_loss_sum`` / the former fp32-copy-of-every-logit formula, same logits, same run. Target <= 0.5.
8. ``sharding``      — FSDP2 vs DDP on 2 gloo ranks, full fine-tuning: weights + grads + AdamW held per rank
   (target fsdp / ddp <= 0.55) and step time (informational).
9. ``packing``       — tokens/s of packed rows (``train.packing``) / padded batches on text of mixed lengths, the
   same examples side by side, the same loss (target >= 1.3).
10. ``data_memory``  — a worker's peak memory (VmHWM) over one epoch of image-text batches with 10x the records
   / with 1x, cache warm, clean processes (target <= 1.10).
"""

BENCHMARKS = ["data_cache", "freeze", "ray_overhead", "trial_cost", "early_stopping", "gpu", "loss_memory", "sharding", "packing", "data_memory"]  # run order
