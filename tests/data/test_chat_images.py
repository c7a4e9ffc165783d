"""Chat records with images of different sizes through the presets' real processors (LLaVA: fixed 3x32x32;
Idefics3: a varying number of tiles; Qwen2-VL and Qwen3-VL: dynamic resolution, a varying number of patches and a
(t, h, w) grid per image), batched as each processor batches, and learned by the real tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines.config.data import DataConfig, DataError
from pipelines.data.dataset import IGNORE_INDEX, collate, load_datasets, pad_token_id
from pipelines.models.loading import load_model, load_processor

SIZES = [(20, 12), (64, 30), (40, 64), (33, 33)]
COLOURS = ["red", "green", "blue", "white"]
RGB = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "white": (250, 250, 250)}
VLM = ["tiny-llava", "tiny-idefics3", "tiny-qwen2-vl", "tiny-qwen3-vl"]
QWEN = {"tiny-qwen2-vl", "tiny-qwen3-vl"}


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory, materialize_vlm):
    root = tmp_path_factory.mktemp("vlm-models")
    return {name: materialize_vlm(name, root) for name in VLM}


def chat_data(folder: Path, n: int) -> str:
    """Messages records: one or two images of different sizes and colours; the answer names the colours."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        count = 1 + i % 2
        names, colours = [], []
        for j in range(count):
            colour = COLOURS[(i + 3 * j) % len(COLOURS)]
            name = f"img_{i}_{j}.png"
            Image.new("RGB", SIZES[(i + j) % len(SIZES)], RGB[colour]).save(folder / name)
            names.append(name)
            colours.append(colour)
        content = [{"type": "image", "image": name} for name in names] + [{"type": "text", "text": "Colours?"}]
        records.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content},
                                     {"role": "assistant", "content": " and ".join(colours)}]})
    path = folder / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("preset", VLM)
def test_image_chat_labels_batches_and_learns(tmp_path, vlm_dirs, preset):
    proc = load_processor(vlm_dirs[preset])
    train = chat_data(tmp_path / "data", 8)
    cfg = DataConfig(train=train, cache_dir=str(tmp_path / "cache"), eval_fraction=0, max_length=320)  # Idefics3: up to 271
    examples, _ = load_datasets(cfg, proc, seed=0)
    records = [json.loads(line) for line in Path(train).read_text().splitlines()]
    tok = proc.tokenizer
    for ex, record in zip(examples, records):
        learned = ex["labels"] != IGNORE_INDEX
        # exactly the answer and its end-of-turn token, never an image slot
        assert tok.decode(ex["input_ids"][learned]) == record["messages"][2]["content"] + "<|im_end|>"
        assert not (learned & (ex["input_ids"] == proc.image_token_id)).any()
    if preset == "tiny-idefics3":  # tiles: the images' sizes decide how many each record has
        assert len({ex["pixel_values"].shape[1] for ex in examples}) > 1
    elif preset in QWEN:  # patches: one grid row per image, the images' sizes decide its h and w
        assert [ex["image_grid_thw"].shape[0] for ex in examples[:2]] == [1, 2]
        assert len({tuple(grid.tolist()) for ex in examples for grid in ex["image_grid_thw"]}) > 1
        for ex in examples:
            assert ex["pixel_values"].shape[0] == int(ex["image_grid_thw"].prod(dim=1).sum())
            merged = ex["image_grid_thw"].prod(dim=1).sum() // 4  # one image token per 2x2 patches
            assert int((ex["input_ids"] == proc.image_token_id).sum()) == merged
    else:
        assert [ex["pixel_values"].shape[0] for ex in examples[:2]] == [1, 2]

    batch = collate(examples[:4], pad_token_id(proc))
    image_slots = int((batch["input_ids"] == proc.image_token_id).sum())
    if preset == "tiny-idefics3":
        assert batch["pixel_values"].shape[:2] == (4, max(ex["pixel_values"].shape[1] for ex in examples[:4]))
        assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "pixel_attention_mask"}
    elif preset in QWEN:  # patches concatenated, grid rows stacked in record order, token types padded per token
        assert torch.equal(batch["pixel_values"], torch.cat([ex["pixel_values"] for ex in examples[:4]]))
        assert torch.equal(batch["image_grid_thw"], torch.cat([ex["image_grid_thw"] for ex in examples[:4]]))
        assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw",
                              "mm_token_type_ids"}
        assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
    else:
        assert batch["pixel_values"].shape == (6, 3, 32, 32)  # 1 + 2 + 1 + 2 images, concatenated
        assert image_slots == 6 * 17

    model = load_model(vlm_dirs[preset])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.8 * losses[0]


def test_more_image_parts_than_placeholders_is_refused(tmp_path, vlm_dirs):
    proc = load_processor(vlm_dirs["tiny-llava"])
    train = chat_data(tmp_path / "data", 2)
    no_images = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
                 "{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}"
                 "{% endif %}{% endfor %}")
    cfg = DataConfig(train=train, cache_dir=str(tmp_path / "c"), eval_fraction=0, chat_template=no_images)
    with pytest.raises(DataError, match=r"chat\.jsonl, line 1: 1 image\(s\) but the chat template rendered 0 "
                                        r"`<image>` placeholder"):
        load_datasets(cfg, proc, seed=0)


def test_cutting_image_tokens_is_refused(tmp_path, vlm_dirs):
    proc = load_processor(vlm_dirs["tiny-llava"])
    train = chat_data(tmp_path / "data", 2)
    cfg = DataConfig(train=train, cache_dir=str(tmp_path / "c"), eval_fraction=0, max_length=24)
    with pytest.raises(DataError, match=r"chat\.jsonl, line 1: .* max_length = 24 would cut image tokens"):
        load_datasets(cfg, proc, seed=0)


def mixed_chat_data(folder: Path, n: int) -> str:
    """Messages records, every other one text-only (no image part): a chat file mixing both."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        if i % 2:
            records.append({"messages": [{"role": "user", "content": f"Count to {i % 5 + 1}."},
                                         {"role": "assistant", "content": " ".join(str(k) for k in range(1, i % 5 + 2))}]})
            continue
        colour = COLOURS[i % len(COLOURS)]
        name = f"img_{i}.png"
        Image.new("RGB", SIZES[i % len(SIZES)], RGB[colour]).save(folder / name)
        records.append({"messages": [{"role": "user", "content": [{"type": "image", "image": name},
                                                                  {"type": "text", "text": "Colour?"}]},
                                     {"role": "assistant", "content": colour}]})
    path = folder / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("preset", VLM)
def test_chat_file_mixing_image_and_text_only_records(tmp_path, vlm_dirs, preset):
    """Text-only records in a file with image records: no image tensors of their own, cached and read back as
    such, and batched with image records so that every row of the batch gets exactly what it gets alone."""
    from pipelines.data import dataset

    proc = load_processor(vlm_dirs[preset])
    train = mixed_chat_data(tmp_path / "data", 6)
    cfg = DataConfig(train=train, cache_dir=str(tmp_path / "cache"), eval_fraction=0, max_length=256)
    examples, _ = load_datasets(cfg, proc, seed=0)
    hits = dataset.cache_stats["cache_hits"]
    cached, _ = load_datasets(cfg, proc, seed=0)
    assert dataset.cache_stats["cache_hits"] == hits + 1
    assert [sorted(ex) for ex in examples] == [sorted(ex) for ex in cached]
    assert all(torch.equal(ex[k], c[k]) for ex, c in zip(examples, cached) for k in ex)
    has_images = ["pixel_values" in ex for ex in cached]
    assert has_images == [True, False] * 3
    for ex, images in zip(cached, has_images):
        assert bool((ex["input_ids"] == proc.image_token_id).any()) == images

    batch = collate(cached[:4], pad_token_id(proc))  # image, text, image, text
    assert batch["input_ids"].shape[0] == 4
    # the two image records' images (LLaVA), rows (Idefics3) or patches (Qwen) only
    assert torch.equal(batch["pixel_values"], torch.cat([cached[0]["pixel_values"], cached[2]["pixel_values"]]))

    model = load_model(vlm_dirs[preset]).eval()
    with torch.no_grad():
        logits = model(**batch).logits
        for i, ex in enumerate(cached[:4]):
            alone = model(**collate([ex], pad_token_id(proc))).logits[0]
            assert torch.allclose(logits[i, : len(ex["input_ids"])], alone, atol=1e-4), i
