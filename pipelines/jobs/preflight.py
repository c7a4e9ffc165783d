"""Everything cheap that can be wrong, checked before Ray starts: the store, the model, the strategy
against the model (meta device), the data (tokenised once, cached), and what every node must reach."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from pipelines import tracking
from pipelines.config.run import RunConfig
from pipelines.data import storage as storage_fs
from pipelines.data.dataset import Head, load_datasets, shard
from pipelines.data.packing import attention_implementation, packed_shard
from pipelines.jobs import ray_env
from pipelines.jobs.importance import apply_importance
from pipelines.jobs.sources import resolve_data_sources, resolve_model, skeleton_plan
from pipelines.models.loading import check_weights, classifier_labels, load_processor, max_positions, read_config

log = logging.getLogger("freezetune.preflight")


@dataclass
class Prepared:
    cfg: RunConfig
    model_path: str
    plan_summary: dict
    steps_per_epoch: int
    n_train: int
    n_eval: int


def default_run_name(cfg: RunConfig, kind: str | None = None, extra: str | None = None) -> str:
    """`<model>-<strategy>-<digest>` (or `<kind>-<model>-<digest>`): the same config gets the same name."""
    content = cfg.to_dict() if extra is None else [cfg.to_dict(), extra]
    digest = hashlib.sha1(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:8]
    model = Path(cfg.model).name if os.path.sep in cfg.model else cfg.model
    return f"{kind}-{model}-{digest}" if kind else f"{model}-{cfg.strategy.name}-{digest}"


def prepare(cfg: RunConfig) -> Prepared:
    """All checks and the data cache, before any Ray worker starts."""
    tracking.check_tracking_uri(cfg.tracking_uri)
    if cfg.trust_remote_code:
        log.warning("model `%s`: trust_remote_code=True runs Python code shipped with the model (here and on every "
                    "worker); only use it for sources you trust.", cfg.model)
    resolve_data_sources(cfg)
    model_path = resolve_model(cfg)
    if Path(model_path).is_dir():
        check_weights(model_path)  # a truncated download fails here, not in every worker
    config = read_config(model_path, trust_remote_code=cfg.trust_remote_code)
    check_length(cfg, config)
    apply_importance(cfg, model_path)  # importance_top_k: strategy.importance_from -> strategy.importance
    plan = skeleton_plan(model_path, cfg)
    processor = load_processor(model_path, trust_remote_code=cfg.trust_remote_code)
    # tokenise once here: the workers (and later trials) read the cache
    head = Head(classifier_labels(config))
    train_set, eval_set = load_datasets(cfg.data, processor, seed=cfg.seed, head=head, loss_on=cfg.train.loss_on)
    if cfg.train.packing:
        try:
            attention_implementation(plan.model, cfg.data.max_length)
            per_worker = len(packed_shard(train_set, cfg.data.max_length, 0, cfg.resources.num_workers))
        except ValueError as err:
            raise ValueError(f"train.packing: {err}") from None
    else:
        per_worker = len(shard(train_set, 0, cfg.resources.num_workers))
    if per_worker == 0:
        raise ValueError(f"data.train: {len(train_set)} examples cannot feed {cfg.resources.num_workers} workers; "
                         "add data or lower resources.num_workers.")
    if not eval_set:
        log.warning("no eval data (data.eval_fraction = 0 and no data.eval): eval_loss is NaN every epoch, and a "
                    "sweep cannot rank this run; give data.eval or data.eval_fraction > 0 to measure it.")
    steps = math.ceil(math.ceil(per_worker / cfg.train.batch_size) / cfg.train.grad_accum)
    summary = plan.summary(1, model_name=cfg.model, precision="fp32" if cfg.train.precision == "fp32" else "bf16")
    return Prepared(cfg, model_path, summary, steps, len(train_set), len(eval_set))


def check_length(cfg: RunConfig, config) -> None:
    """Examples longer than the model's positions index past its position table (or its RoPE range)."""
    limit = max_positions(config)
    if limit is not None and cfg.data.max_length > limit:
        raise ValueError(f"data.max_length = {cfg.data.max_length}: the model has {limit} positions "
                         f"(max_position_embeddings); lower data.max_length to at most {limit}.")


def check_cluster_reach(cfg: RunConfig, model_path: str) -> None:
    """Jobs must not depend on the submitting machine: on a multi-node cluster every node must see these.

    A URI storage_path (s3://..., gs://...) is created there, through pyarrow as Ray writes it, never as a
    local folder: a missing bucket or refused credentials fail here, before Ray starts any worker."""
    try:
        storage_fs.mkdir(cfg.resolved_storage_path)
    except OSError as err:
        raise storage_fs.StorageError(f"storage_path = {cfg.resolved_storage_path}: cannot be created ({err}); check "
                                   "the bucket exists and the credentials may write to it.") from None
    paths = {"storage_path": cfg.resolved_storage_path, "model": model_path if os.path.isdir(model_path) else "",
             "data.train": cfg.data.train, "data.eval": cfg.data.eval or ""}
    urls = {}
    uri = cfg.tracking_uri
    if uri.startswith("sqlite:///"):
        paths["mlflow.tracking_uri (SQLite file)"] = str(Path(uri[len("sqlite:///"):]).expanduser().absolute().parent)
    elif uri.startswith(("http://", "https://")):
        urls["mlflow.tracking_uri"] = uri.rstrip("/") + "/health"
    ray_env.check_reachable_from_all_nodes(paths, urls)


def fresh_name(storage: str, name: str) -> str:
    """Without --resume a rerun gets its own Ray storage folder (Ray would otherwise resume the old one)."""
    candidate, n = name, 1
    while storage_fs.exists(storage_fs.join(storage, candidate)):  # a folder, or a URI's prefix
        n += 1
        candidate = f"{name}-{n}"
    return candidate
