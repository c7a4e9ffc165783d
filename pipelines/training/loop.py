"""The per-worker fine-tuning loop: one file, read top to bottom.

Runs inside a Ray Train worker (``pipelines.training.worker``) or in-process
(``run_loop`` with ``world_size=1``). Every strategy goes through the same
loop; the plan from ``strategies`` decides what trains and at which LR.

Phases: set-up (seed, model, plan, data, FSDP2 sharding, optimizer, schedule, resume) →
per epoch, one ``step.train_step`` per accumulation window (batches collated one window at a time, in a
seeded order), each preceded by the thaw stage it falls in (DDP re-wrapped when the trainable set changes);
every ``train.report_every`` steps and at the epoch's end a report (a bounded eval inside the epoch, the full
eval at its end) and, at the end or every ``train.save_every`` steps, a checkpoint that says where in the
epoch it was taken, so a resumed run skips exactly the batches already seen → final model. No Ray and no
MLflow here.

``resources.parallel`` picks how several workers share the work: ``ddp`` replicates the model on every
rank; ``fsdp`` shards parameters, gradients and optimizer state over the ranks (``sharding``); ``auto``
shards when the plan's bytes do not fit the worker's GPU.

Reports the metrics of ``pipelines.config.metrics``: ``eval_accuracy`` for sequence classifiers only, and
NaN eval metrics when no eval example was scored (a 0 would rank as the best loss of a sweep).
"""

from __future__ import annotations

import logging
import math
import random
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipelines.config.run import DEFAULT_REPORT_EVERY, RunConfig
from pipelines.data.dataset import collate, load_datasets, shard
from pipelines.data.packing import attention_implementation, packed_shard
from pipelines.models.loading import load_model, load_processor, meta_model
from pipelines.training import checkpoints, sharding
from pipelines.training.progress import ProgressBar, Tally
from pipelines.training.precision import LOAD_DTYPES, apply_precision_policy, held_bytes
from pipelines.training.recompute import enable_activation_checkpointing
from pipelines.training.step import (correct_predictions, forward, is_classification, labelled_tokens, summed_loss,
                                     train_step)
from strategies.memory import human_bytes
from strategies.plan import Plan, build_plan, stage_steps
from strategies.schedules import build_scheduler

log = logging.getLogger("freezetune.loop")

# A report: (metrics, checkpoint directory or None). Ray's report in a worker, a list append in tests.
ReportFn = Callable[[dict, "str | None"], None]


@dataclass
class WorkerEnv:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    resume_dir: str | None = None  # a checkpoint directory to resume from


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _all_reduce_sum(values: list[float], env: WorkerEnv) -> list[float]:
    if env.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def _all_reduce_max(value: float, env: WorkerEnv) -> float:
    if env.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def build_model(cfg: RunConfig, model_path: str, on_meta: bool = False) -> Plan:
    """The model as it trains: loaded, planned (LoRA wrapped), precision policy applied; on the CPU. ``on_meta``:
    the same model on the meta device, no weight read or allocated (seconds, even for a 70B config)."""
    options = cfg.model_options
    if on_meta:
        with torch.device("meta"):
            plan: Plan = build_plan(meta_model(model_path, cfg.trust_remote_code, options.attn_implementation),
                                    cfg.strategy)
    else:
        model = load_model(model_path, trust_remote_code=cfg.trust_remote_code, dtype=LOAD_DTYPES[options.dtype],
                           attn_implementation=options.attn_implementation)
        plan = build_plan(model, cfg.strategy)
    # fp32 for whatever trains at some point (later thaws and LoRA included), the compute dtype for the rest
    apply_precision_policy(plan.model, plan.ever_trainable_names, cfg.train.precision)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(plan.model)
    return plan


def choose_parallel(cfg: RunConfig, plan: Plan, env: WorkerEnv, device_bytes: int | None = None) -> str:
    """ddp or fsdp for this run: what ``resources.parallel`` asks; ``auto`` shards when the plan's bytes
    (weights, grads, AdamW state at the largest stage, activations at the configured batch) do not fit 90% of
    the worker's GPU (``device_bytes``, default: read from the device; CPU workers stay ddp). One worker has
    nothing to shard with."""
    wanted = cfg.resources.parallel
    if env.world_size == 1:
        if wanted == "fsdp":
            log.info("resources.parallel = fsdp with one worker: nothing to shard over, training unsharded")
        return "ddp"
    if wanted != "auto":
        return wanted
    if device_bytes is None:
        if env.device.type != "cuda":
            return "ddp"  # CPU workers: no device memory to run out of before the host's
        device_bytes = torch.cuda.get_device_properties(env.device).total_memory
    memory = plan.summary(epoch=plan.num_stages, precision=cfg.train.precision, batch=cfg.train.batch_size,
                          length=cfg.data.max_length, checkpointing=cfg.train.activation_checkpointing,
                          device=env.device.type)["memory"]
    need = memory["peak_bytes"]
    choice = "fsdp" if need > 0.9 * device_bytes else "ddp"
    if env.rank == 0:
        log.info("resources.parallel = auto: a replica needs %s (plan), the GPU has %s: %s", human_bytes(need),
                 human_bytes(device_bytes), choice)
    return choice


def run_loop(cfg: RunConfig, model_path: str, env: WorkerEnv, report: ReportFn,
             on_setup: Callable[[Plan, torch.optim.Optimizer], None] | None = None) -> None:
    """Train as ``cfg`` says; ``on_setup(plan, optimizer)`` lets tests and benchmarks look inside."""
    t = cfg.train
    seed_everything(cfg.seed)

    # --- set-up: model, plan, data -------------------------------------------
    # Sharded, every rank builds the model on the meta device and shards it; only rank 0 reads the weights
    # (one full copy, on its CPU) and broadcasts them into everyone's shards. Replicated, every rank loads.
    # (The RNG is left as seeded: ranks that build different things still draw the same dropout masks after.)
    with torch.random.fork_rng(devices=[]):
        sharded = False
        if env.world_size > 1 and cfg.resources.parallel != "ddp":  # the decision needs the plan, not weights
            plan = build_model(cfg, model_path, on_meta=True)
            sharded = choose_parallel(cfg, plan, env) == "fsdp"
        if sharded:
            source = build_model(cfg, model_path).model if env.rank == 0 else None
            sharding.shard_model(plan.model, plan, t.precision)
            sharding.load_from_rank0(plan.model, source, env.device)
            del source
        else:
            plan = build_model(cfg, model_path)
    model = plan.model.to(env.device)
    processor = load_processor(model_path, trust_remote_code=cfg.trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_set, eval_set = load_datasets(cfg.data, processor, seed=cfg.seed, loss_on=cfg.train.loss_on)
    if t.packing:  # rows of several examples; every rank packs the whole set alike, then takes its rows
        attention_implementation(model, cfg.data.max_length)  # refuses attention that cannot take the mask
        train_shard = packed_shard(train_set, cfg.data.max_length, env.rank, env.world_size)
    else:
        train_shard = shard(train_set, env.rank, env.world_size)
    eval_shard = eval_part(eval_set, env.rank, env.world_size)
    classifier = is_classification(train_set[0]["labels"], batched=False)  # reports eval_accuracy too
    first_batch = collate(list(train_shard[: t.batch_size]), pad_id)  # a list: collate walks it several times

    # --- sharded: one warm-up forward before any freezing (see sharding.warm_up)
    if sharded:
        sharding.warm_up(model, plan, first_batch, lambda m, b: forward(m, b, t.precision, env.device), stage=1)
        if env.rank == 0:
            log.info("FSDP2 over %d ranks: %d units + the root", env.world_size, len(sharding.unit_paths(plan)))

    steps_per_epoch = math.ceil(math.ceil(len(train_shard) / t.batch_size) / t.grad_accum)
    total_steps = steps_per_epoch * t.epochs
    report_every = t.report_every or DEFAULT_REPORT_EVERY
    steps_per_stage = stage_steps(cfg.strategy.thaw_every, total_steps)  # None: a thaw stage per epoch
    optimizer = torch.optim.AdamW(plan.param_groups(), betas=tuple(t.adam_betas), eps=t.adam_eps)
    scheduler = build_scheduler(optimizer, total_steps, t.schedule)
    scaler = _grad_scaler(env.device, enabled=t.precision == "fp16", sharded=sharded)
    # VLMs read vision features from a chosen layer (LLaVA: -2), so trained vision blocks/norms above it get no
    # gradient: DDP must look for unused parameters then, and only then (it costs a graph traversal per step).
    trains_vision = any(plan.parts.part_of(n) == "vision" for n in plan.ever_trainable_names)
    find_unused = t.find_unused_parameters if t.find_unused_parameters is not None else trains_vision

    # where training starts: the first batch of epoch 1, or the batch after a checkpoint's (mid-epoch too)
    start_epoch, step, skip_batches, epoch_tally = 1, 0, 0, Tally()
    if env.resume_dir:
        if checkpoints.is_sharded_checkpoint(env.resume_dir) != sharded:
            raise ValueError(f"checkpoint {env.resume_dir} was written {'un' if sharded else ''}sharded and this run "
                             f"is {'' if sharded else 'not '}sharded; resume with the resources.parallel and "
                             "num_workers it was written with")
        state = (checkpoints.load_sharded(env.resume_dir, plan, optimizer, scheduler, scaler) if sharded else
                 checkpoints.load(env.resume_dir, model, optimizer, scheduler, scaler))
        step = state["step"]
        if state.get("epoch_complete", True):
            start_epoch = state["epoch"] + 1
        else:  # inside an epoch: the same epoch, from the batch after the checkpoint's, with its sums so far
            start_epoch, skip_batches = state["epoch"], state["batches_done"]
            epoch_tally = Tally.from_dict(state.get("tally"))
        log.info("rank %d: resumed from %s at epoch %d, batch %d (optimizer step %d)", env.rank, env.resume_dir,
                 start_epoch, skip_batches, step)

        if start_epoch > t.epochs:
            # the run had finished before it was interrupted: say so again, so Tune gets the final result
            report(state["metrics"], env.resume_dir if env.rank == 0 else None)
            return
    if on_setup is not None:
        on_setup(plan, optimizer)

    progress = ProgressBar(total_steps, step, enabled=t.progress_bar and env.rank == 0)
    ddp_model, wrapped_for, stage, warned = None, None, None, False

    def thaw(epoch: int) -> tuple:
        """The stage for this step (progressive: the thawed blocks); DDP registers its hooks on the trainable
        set, so re-wrap when it changes. Returns (the model to step, its trainable parameters)."""
        nonlocal ddp_model, wrapped_for, stage
        wanted = epoch if steps_per_stage is None else 1 + step // steps_per_stage
        if wanted != stage:
            plan.apply(wanted)
            stage = wanted
        trainable = [p for p in model.parameters() if p.requires_grad]
        trainable_ids = frozenset(id(p) for p in trainable)
        if env.world_size > 1 and not sharded and trainable_ids != wrapped_for:
            ddp_model = DistributedDataParallel(model, find_unused_parameters=find_unused,
                                                device_ids=[env.device.index] if env.device.type == "cuda" else None)
            wrapped_for = trainable_ids
        return (ddp_model if env.world_size > 1 and not sharded else model), trainable

    def eval_totals(max_batches: int | None) -> EvalTotals:
        nonlocal warned
        totals = evaluate(model, eval_shard, t.batch_size, pad_id, t.precision, env, max_batches,
                          filler=first_batch if sharded else None)
        if not totals.terms and env.rank == 0 and not warned:
            # NaN, never 0: a 0 would be a perfect score that ASHA keeps and `compare` ranks first
            log.warning("no eval data: %s; eval_loss is NaN and a sweep will not rank this run",
                        _no_eval_reason(cfg, totals))
            warned = True
        return totals

    last_saved = step
    for epoch in range(start_epoch, t.epochs + 1):
        model.train()
        skip = skip_batches if epoch == start_epoch else 0
        tally = epoch_tally if epoch == start_epoch else Tally()
        since_report = Tally()
        order = epoch_order(len(train_shard), cfg.seed * 1000 + epoch)
        n_batches = math.ceil(len(order) / t.batch_size)
        for first in range(skip, n_batches, t.grad_accum):  # one optimizer step per accumulation window
            net, trainable = thaw(epoch)
            window = [collate([train_shard[i] for i in order[b * t.batch_size:(b + 1) * t.batch_size]], pad_id)
                      for b in range(first, min(first + t.grad_accum, n_batches))]
            started = time.perf_counter()
            try:
                done = train_step(net, window, optimizer, trainable=trainable, device=env.device,
                                  precision=t.precision, max_grad_norm=t.max_grad_norm, scheduler=scheduler,
                                  scaler=scaler)
            except FloatingPointError as err:
                raise FloatingPointError(
                    f"epoch {epoch}, optimizer step {step}: {err}; lower the learning rate "
                    f"(strategy.lr = {cfg.strategy.lr}) or check the data. Training stopped.") from None
            seconds = time.perf_counter() - started
            tally.add(done, seconds)
            since_report.add(done, seconds)
            step += 1
            progress.step(done.loss_sum / max(done.loss_tokens, 1), epoch)
            batches_done = first + len(window)
            epoch_end = batches_done >= n_batches
            if not epoch_end and step % report_every:
                continue

            # --- a report: inside the epoch, a bounded eval; at its end, the full eval and the epoch's sums
            interval = _summed(since_report, env)
            whole = _summed(tally, env) if epoch_end else interval
            cap = t.eval_max_batches if epoch_end else min(t.report_eval_batches, t.eval_max_batches or math.inf)
            totals = eval_totals(cap)
            model.train()
            metrics = {
                "epoch": epoch,
                "progress": step / steps_per_epoch,  # epochs done, fractional: ASHA's clock
                "epoch_end": int(epoch_end),
                "optimizer_steps": step,
                "train_loss": whole["train_loss"],
                **totals.metrics(classifier),
                "trainable_params": sum(p.numel() for p in trainable),
                "total_params": sum(p.numel() for p in model.parameters()),
                "tokens_per_s": whole["tokens_per_s"],
                "peak_memory_mb": peak_memory_mb(env.device),
                "grad_norm": (tally if epoch_end else since_report).grad_norm,
                # what this rank holds, counted from its tensors (the plan predicts the same three)
                **{f"memory/{k}": v for k, v in held_bytes(model, optimizer).items()},
                "memory/grads_bytes": tally.grads_bytes,
                "memory/shards": env.world_size if sharded else 1,
                "memory/trainable_without_grad": tally.unused[0],
                "memory/trainable_tensors_without_grad": tally.unused[1],
                # the step axis: what happened since the last report (MLflow logs these at the optimizer step)
                "step/train_loss": interval["train_loss"],
                "step/tokens_per_s": interval["tokens_per_s"],
                "step/grad_norm": since_report.grad_norm,
                **{f"step/{k}": v for k, v in totals.metrics(classifier).items()},
            }
            if epoch_end:
                metrics["epoch_seconds"] = tally.seconds
            for group in optimizer.param_groups:
                metrics[f"lr/{group['name']}"] = metrics[f"step/lr/{group['name']}"] = group["lr"]
            if tally.unused[0] and epoch == start_epoch and epoch_end:
                log.warning("epoch %d: %d trainable parameters (%d tensors) got no gradient: the model does not use "
                            "them for this loss (e.g. vision layers above the feature layer); they are not updated",
                            epoch, *tally.unused)
            if scaler.is_enabled():
                metrics["amp_skipped_steps"] = tally.skipped
                if tally.skipped and epoch_end:
                    log.warning("epoch %d: the fp16 GradScaler skipped %d of %d steps (inf/nan gradients)",
                                epoch, tally.skipped, steps_per_epoch)
            since_report = Tally()

            # --- checkpoint (rank 0 writes, or every rank its shards; every rank reports: report is a barrier):
            # every epoch end; inside an epoch, the first report on or after each multiple of save_every
            save = epoch_end or (t.save_every is not None and step // t.save_every > last_saved // t.save_every)
            position = {"stage": stage, "epoch_complete": epoch_end, "batches_done": 0 if epoch_end else batches_done,
                        "tally": None if epoch_end else tally.to_dict()}
            final = epoch_end and epoch == t.epochs
            with tempfile.TemporaryDirectory(prefix="freezetune-ckpt-") as tmp:
                ckpt_dir = None
                if save and sharded:
                    checkpoints.save_sharded(tmp, plan, optimizer, scheduler, scaler, env.rank, epoch=epoch,
                                             step=step, metrics=metrics, position=position)
                    ckpt_dir = tmp
                elif save and env.rank == 0:
                    checkpoints.save(tmp, plan, optimizer, scheduler, scaler, epoch=epoch, step=step,
                                     metrics=metrics, position=position)
                    ckpt_dir = tmp
                if save:
                    last_saved = step
                if final and t.save != "none":
                    _save_final_model(Path(tmp) / "final_model", cfg, model_path, plan, processor, env, sharded)
                report(metrics, ckpt_dir)
    progress.close()


def epoch_order(n: int, seed: int) -> list[int]:
    """The epoch's example order: a seeded shuffle, the same on every run (a resumed one skips a prefix)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _summed(tally: Tally, env: WorkerEnv) -> dict[str, float]:
    """train_loss and tokens/s of ``tally`` over all workers (tokens of every worker per second of this one's)."""
    loss_sum, tokens, seen = _all_reduce_sum([tally.loss_sum, tally.tokens, tally.seen_tokens], env)
    return {"train_loss": loss_sum / max(tokens, 1),
            "tokens_per_s": seen / tally.seconds if tally.seconds > 0 else 0.0}


def _grad_scaler(device: torch.device, enabled: bool, sharded: bool):
    """fp16's loss scaler; sharded, it agrees across ranks on skipping a step (an inf in one rank's shard)."""
    if sharded and enabled:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type, enabled=enabled)


def _save_final_model(directory: Path, cfg: RunConfig, model_path: str, plan: Plan, processor, env: WorkerEnv,
                      sharded: bool) -> None:
    """Rank 0 writes the final model. Sharded, every rank first gathers the trained weights onto rank 0
    (one parameter at a time), which loads them into an unsharded copy of the model and saves that."""
    merged = cfg.train.save == "merged"
    if not sharded:
        if env.rank == 0:
            checkpoints.save_final_model(directory, plan, processor, merged=merged)
        return
    trained = sharding.full_trained_state(plan.model, plan.ever_trainable_names, env.rank)
    if env.rank == 0:
        whole = build_model(cfg, model_path)
        whole.model.load_state_dict(trained, strict=False)
        checkpoints.save_final_model(directory, whole, processor, merged=merged)


# --- eval ------------------------------------------------------------------------------------


def eval_part(dataset: list, rank: int, world_size: int) -> list:
    """Worker ``rank``'s eval examples: every ``world_size``-th from ``rank`` on, the remainder kept, so every
    eval example is evaluated exactly once. Parts may differ in length or be empty (fewer examples than
    workers): eval runs the unwrapped model, whose forward has no collectives, and only the final all-reduce
    in :func:`evaluate`, which every rank runs. (Training shards must stay equal: DDP steps in lockstep.)"""
    if not 0 <= rank < world_size:
        raise ValueError(f"eval_part: rank {rank} is not in [0, {world_size})")
    return dataset[rank::world_size]


@dataclass
class EvalTotals:
    """Eval sums over all workers; the metrics are their ratios."""

    loss_sum: float = 0.0
    terms: float = 0.0  # the loss's divisor: labelled tokens (labelled examples for a classifier)
    correct: float = 0.0  # classifier: labelled examples predicted right
    examples: float = 0.0  # examples evaluated

    def metrics(self, classifier: bool) -> dict[str, float]:
        """eval_loss (and eval_accuracy for a classifier); NaN when nothing was scored on any worker."""
        nan = float("nan")
        out = {"eval_loss": self.loss_sum / self.terms if self.terms else nan}
        if classifier:
            out["eval_accuracy"] = self.correct / self.terms if self.terms else nan
        return out


@torch.no_grad()
def evaluate(model, dataset, batch_size: int, pad_id: int, precision: str, env: WorkerEnv,
             max_batches: int | None = None, filler: dict | None = None) -> EvalTotals:
    """The loss (and a classifier's right answers) over this worker's eval examples, summed over all workers.
    Every rank must call it (the all-reduce), with or without examples of its own.

    A sharded model all-gathers in every forward, so every rank must run as many: give ``filler`` (any
    batch) and a rank with fewer eval batches runs it, unscored, until the rank with the most is done."""
    model.eval()
    loss_sum = terms = correct = examples = 0.0
    n_batches = math.ceil(len(dataset) / batch_size)
    n_batches = n_batches if max_batches is None else min(n_batches, max_batches)
    if filler is not None:
        most = int(_all_reduce_max(n_batches, env))
        for _ in range(most - n_batches):
            forward(model, filler, precision, env.device)
    for b in range(n_batches):  # collated one at a time: never the whole eval set at once
        batch = collate([dataset[i] for i in range(b * batch_size, min((b + 1) * batch_size, len(dataset)))], pad_id)
        logits, labels = forward(model, batch, precision, env.device)
        loss_sum += float(summed_loss(logits, labels))
        terms += labelled_tokens(batch)
        if is_classification(labels):
            correct += correct_predictions(logits, labels)
        examples += len(labels)
    sharding.reshard(model)
    return EvalTotals(*_all_reduce_sum([loss_sum, terms, correct, examples], env))


def _no_eval_reason(cfg: RunConfig, totals: EvalTotals) -> str:
    """Why no eval example was scored, for the warning."""
    if not totals.examples:
        return f"data.eval_fraction = {cfg.data.eval_fraction:g} and no data.eval"
    return f"every label of the {totals.examples:.0f} eval examples is masked (-100): nothing to score"
