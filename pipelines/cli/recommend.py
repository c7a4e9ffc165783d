"""`freezetune recommend`: strategies ranked for a model and a data set, and a tune space around them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "strategies to try first for a model and a data set, with a tune space around them"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="built-in preset or a model folder (config + tokenizer/processor)")
    p.add_argument("--data", required=True, help="the training data (.jsonl, .json or .parquet): every record is "
                   "read and checked; tokens are estimated from a sample")
    p.add_argument("--gpu-memory-gb", type=float, help="memory of one GPU: which strategies fit one, or need FSDP")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch size per GPU for the activation estimate")
    p.add_argument("--length", type=int, default=512, help="tokens per example for the activation estimate")
    p.add_argument("--out", default="recommended_space.yaml", help="where the tune space is written")
    p.add_argument("--importance", metavar="RUN_ID|FILE", help="a layer-importance ranking: the MLflow run id of a "
                   "`freezetune analyze` run (MLFLOW_TRACKING_URI) or its ranking.json; ranks importance_top_k")
    p.add_argument("--importance-measure", default="ablation", help="the ranking's measure: ablation, influence, "
                   "grad_norm or fisher")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--trust-remote-code", action="store_true")


def run(args: argparse.Namespace) -> int:
    import yaml

    from pipelines.models.loading import load_processor, resolve_model_path  # lazy: transformers; keeps --help fast
    from pipelines.reporting import recommend  # lazy: model code; keeps freezetune --help fast

    for flag, value in (("--batch-size", args.batch_size), ("--length", args.length)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be >= 1.")
    if args.gpu_memory_gb is not None and not args.gpu_memory_gb > 0:
        raise ValueError(f"--gpu-memory-gb {args.gpu_memory_gb}: give one GPU's memory in GB, e.g. 80.")
    if not Path(args.data).is_file():
        raise ValueError(f"--data {args.data}: no such file; give a .jsonl, .json or .parquet data file.")
    importance = None
    if args.importance:
        from pipelines.jobs.importance import resolve_importance  # lazy: Ray and MLflow, only with --importance

        source = str(Path(args.importance).resolve()) if Path(args.importance).is_file() else args.importance
        importance = {"source": source, "measure": args.importance_measure,
                      "ranking": resolve_importance(source, args.importance_measure)}
    processor = load_processor(resolve_model_path(args.model), trust_remote_code=args.trust_remote_code)
    result = recommend.recommend(args.model, args.data, processor, args.gpu_memory_gb, args.precision,
                                 args.batch_size, args.length, args.trust_remote_code, importance)
    Path(args.out).write_text("# freezetune sweep " + args.out + " --dry-run   (written by freezetune recommend)\n"
                              + yaml.safe_dump(result["space"], sort_keys=False))
    if args.json:
        print(json.dumps({**result, "space_file": args.out}))
    else:
        print(recommend.render(result))
        print(f"tune space around the first {len(result['space']['space']['strategy.name']['choice'])}: {args.out} "
              f"(check it with `freezetune sweep {args.out} --dry-run`)")
    return 0
