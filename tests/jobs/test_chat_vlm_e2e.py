"""Chat (`messages`) records with images of different sizes, fine-tuned end to end: `run_training` on Ray Train with
MLflow, for each VLM preset (LLaVA: fixed 32x32 images; Idefics3: a varying number of tiles; Qwen2-VL and Qwen3-VL:
dynamic resolution, a varying number of patches and a grid per image), under the VLM strategies A (connector only),
B (connector + LLM LoRA) and E (full). The eval loss (as logged in MLflow) must fall from epoch 1 to epoch 2.

Cost: 12 fits of ~45-70 s each on 2 cores, nearly all of it Ray Train start-up (an epoch computes in under 1 s).
One worker per fit: two (DDP over gloo) passed too when tried (24 train records), ~20 s more per fit. The tiny LLMs are random, so
strategy A (only the connector learns: it can move nothing but the image slots' embeddings) lowers the eval loss
by ~0.01-0.02 only; the runs are seeded, on CPU, and that fall is the same every time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipelines import tracking
from pipelines.config.run import run_config_from_dict

pytestmark = pytest.mark.slow  # real Ray Train and MLflow

RGB = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
# Idefics3 splits an image longer than 32 px into 32-px tiles (+ the whole image): 3 or 5 images per record here;
# Qwen2-VL's 4-px patches give 1 to 16 image tokens an image, Qwen3-VL's 16-px ones 1 to 4
SIZES = [(16, 16), (40, 20), (20, 48), (64, 64), (30, 12), (12, 30), (24, 40), (48, 24)]
PRESETS = ["tiny-llava", "tiny-idefics3", "tiny-qwen2-vl", "tiny-qwen3-vl"]
STRATEGIES = {
    "A": {"name": "connector_only", "lr": 1e-2},
    "B": {"name": "connector_llm_lora", "lr": 5e-3, "lora_r": 8, "lora_alpha": 16},
    "E": {"name": "full", "lr": 3e-3},
}


def colour_chat(folder: Path, name: str, n: int, offset: int) -> str:
    """`messages` records: a solid-colour image of one of 8 sizes, the user asks its colour, the assistant names it."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(offset, offset + n):
        colour = list(RGB)[i % len(RGB)]
        image = f"{name}_{i}.png"
        Image.new("RGB", SIZES[(i // len(RGB)) % len(SIZES)], RGB[colour]).save(folder / image)
        records.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": colour}]})
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def chat_files(workdir) -> dict:
    folder = workdir / "vlm-chat"
    return {"train": colour_chat(folder, "train", 48, 0), "eval": colour_chat(folder, "eval", 9, 48)}


@pytest.fixture(scope="module")
def vlm_dirs(workdir, materialize_vlm) -> dict:
    return {name: materialize_vlm(name, workdir / "models") for name in PRESETS}


@pytest.mark.parametrize("letter", list(STRATEGIES))
@pytest.mark.parametrize("preset", PRESETS)
def test_chat_vlm_fine_tunes_with_strategy(ray_session, workdir, chat_files, vlm_dirs, preset, letter):
    from pipelines.jobs.train import run_training

    strategy = STRATEGIES[letter]
    root = workdir / f"chat-{preset}-{letter}"
    cfg = run_config_from_dict({
        "model": vlm_dirs[preset], "seed": 0,
        "cache_dir": str(workdir / "chat-cache"), "storage_path": str(root / "runs"),
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "chat-vlm"},
        "strategy": strategy,
        "data": {"train": chat_files["train"], "eval": chat_files["eval"], "max_length": 96},  # 49..66 tokens
        "train": {"epochs": 2, "batch_size": 4, "save": "none"},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    })
    result = run_training(cfg)
    uri, run_id = cfg.tracking_uri, result["run_id"]
    run = tracking.client(uri).get_run(run_id)

    assert run.info.status == "FINISHED"
    assert run.data.tags["strategy"] == strategy["name"]
    assert run.data.tags["vlm_strategy_id"] == letter
    assert (run.data.params["data.n_train"], run.data.params["data.n_eval"]) == ("48", "9")
    eval_curve = tracking.metric_history(uri, run_id, "eval_loss")
    assert [step for step, _ in eval_curve] == [1, 2]
    assert eval_curve[-1][1] < eval_curve[0][1], eval_curve  # it learns the colours
    assert len(tracking.metric_history(uri, run_id, "train_loss")) == 2
