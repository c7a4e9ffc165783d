"""Generated demo data: coloured shapes with captions, and tiny arithmetic text.

Two tasks over the same kind of images, so that a demo can first train its tiny base
model and then fine-tune it on a shifted task:

- ``pretrain``: "<image>\\nWhat is in the picture?" -> "a red circle".
- ``finetune``: "<image>\\nDescribe it." -> "shape: circle; colour: red; side: left".
  Shape and colour are what the pretrained vision encoder already sees; the new
  template and the side (left/right half of the image) are new, so keeping the
  vision side frozen helps with part of the task and not with the rest.

The text files teach addition: pretrain as plain text "12+7=19", finetune as
prompt/completion "add 12 and 7:" -> " 19". Everything is deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30)}
SIZE = 32  # presets.IMAGE_SIZE
TASKS = ("pretrain", "finetune")
PROMPTS = {"pretrain": "<image>\nWhat is in the picture?", "finetune": "<image>\nDescribe it."}


def _draw(rng: random.Random) -> tuple[Image.Image, dict]:
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    half = rng.randint(7, 10)
    side = rng.choice(("left", "right"))
    # Keep the centre at least 3 px off the middle line so "side" is never ambiguous.
    cx = rng.randint(half, SIZE // 2 - 3) if side == "left" else rng.randint(SIZE // 2 + 3, SIZE - 1 - half)
    cy = rng.randint(half, SIZE - 1 - half)
    background = tuple(rng.randint(200, 250) for _ in range(3))
    img = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(img)
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return img, {"shape": shape, "colour": colour, "side": side}


def _answer(task: str, facts: dict) -> str:
    if task == "pretrain":
        return f"a {facts['colour']} {facts['shape']}"
    return f"shape: {facts['shape']}; colour: {facts['colour']}; side: {facts['side']}"


def _text_record(task: str, rng: random.Random) -> dict:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    if task == "pretrain":
        return {"text": f"{a}+{b}={a + b}"}
    return {"prompt": f"add {a} and {b}:", "completion": f" {a + b}"}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def make_demo_data(out_dir: str | Path, n_train: int = 512, n_eval: int = 64, seed: int = 0,
                   task: str = "finetune") -> dict[str, Path]:
    """Writes the demo files under ``out_dir`` and returns their paths.

    Keys: ``train``, ``eval`` (image-text JSONL, images under ``images/``), ``text_train``,
    ``text_eval`` (text JSONL for text presets), ``images`` (the image folder).
    File names carry the task, so both tasks can share one folder.
    """
    if task not in TASKS:
        raise ValueError(f"task = {task!r}: use one of {', '.join(TASKS)}")
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    paths = {"images": images}
    for split, n in (("train", n_train), ("eval", n_eval)):
        # String seeds hash with SHA-512: stable across runs and Python processes.
        rng = random.Random(f"{seed}/{task}/{split}")
        records = []
        for i in range(n):
            img, facts = _draw(rng)
            rel = f"images/{task}_{split}_{i:05d}.png"
            img.save(out / rel)
            records.append({"image": rel, "prompt": PROMPTS[task], "response": _answer(task, facts)})
        paths[split] = out / f"{task}_{split}.jsonl"
        _write_jsonl(paths[split], records)

        text_rng = random.Random(f"{seed}/{task}/text/{split}")
        paths[f"text_{split}"] = out / f"{task}_text_{split}.jsonl"
        _write_jsonl(paths[f"text_{split}"], [_text_record(task, text_rng) for _ in range(n)])
    return paths
