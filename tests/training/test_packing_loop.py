"""`train.packing` through the shipped loop and the driver's checks: the same loss per token as padding, fewer
steps, and image data refused before any worker starts."""

from __future__ import annotations

import pytest

from pipelines.config.run import run_config_from_dict
from pipelines.training.loop import WorkerEnv, run_loop


def _cfg(tmp_path, demo_files, model_dir, packing: bool, **data):
    return run_config_from_dict({
        "model": model_dir, "seed": 1, "cache_dir": str(tmp_path / "cache"),
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "strategy": {"name": "full", "lr": 1e-12},  # no learning: the epoch's loss is the base model's
        "data": {"train": str(demo_files["text_train"]), "eval": str(demo_files["text_eval"]), "max_length": 64,
                 **data},
        "train": {"epochs": 1, "batch_size": 4, "save": "none", "packing": packing},
        "resources": {"num_workers": 1},
    })


def test_packed_rows_give_the_padded_loss_in_fewer_steps(tmp_path, demo_files, model_dirs):
    reports = {}
    for packing in (False, True):
        got = []
        run_loop(_cfg(tmp_path, demo_files, model_dirs["tiny-llama"], packing), model_dirs["tiny-llama"], WorkerEnv(),
                 lambda metrics, ckpt: got.append(metrics))
        reports[packing] = got[-1]
    padded, packed = reports[False], reports[True]
    # the same loss terms over the same examples: no attention or loss term across a row's examples
    assert packed["train_loss"] == pytest.approx(padded["train_loss"], rel=1e-5)
    assert packed["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-6)  # eval is not packed
    assert packed["optimizer_steps"] < padded["optimizer_steps"] / 2, (packed["optimizer_steps"],
                                                                       padded["optimizer_steps"])


def test_packing_image_data_is_refused_before_training(tmp_path, demo_files, model_dirs):
    from pipelines.jobs.preflight import prepare

    cfg = _cfg(tmp_path, demo_files, model_dirs["tiny-llava"], True, train=str(demo_files["train"]),
               eval=str(demo_files["eval"]))
    with pytest.raises(ValueError, match=r"train\.packing: .*image.*train\.packing: false"):
        prepare(cfg)
