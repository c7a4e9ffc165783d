"""The byte tokenizer, preset materialization, and loading through the real from_pretrained path."""

from __future__ import annotations

import logging
import os
import threading

import pytest
import torch
import transformers as tf
from PIL import Image

from pipelines.models import presets
from pipelines.models.loading import ModelLoadError, is_vlm_config, load_model, load_processor, materialize_preset, resolve_model_path
from pipelines.models.tokenizer import IMAGE_TOKEN, build_byte_tokenizer


# ---------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("text", [
    "hello world", "", "  leading and trailing  ", "tabs\tand\nnewlines\r\n",
    "héllo wörld — ünïcode", "中文 日本語 한국어", "emoji 🎉🧪 and zwj 👩‍💻", "\x00\x01 control bytes \x7f",
    "<b>not special</b> <s", "12+7=19",
])
def test_tokenizer_round_trips_utf8(text):
    tok = build_byte_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte
    assert tok.decode(ids) == text


def test_tokenizer_ids_fit_the_presets():
    tok = build_byte_tokenizer()
    assert len(tok) <= presets.VOCAB_SIZE
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == presets.VOCAB_SIZE - 1 == presets.tiny_llava().image_token_index
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    ids = tok("a<image>b")["input_ids"]
    assert ids == [tok.bos_token_id, 4 + ord("a"), presets.VOCAB_SIZE - 1, 4 + ord("b")]  # bos, no eos
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


# ---------------------------------------------------------------- materialize + load
def test_materialize_is_idempotent_and_complete(tmp_path):
    path = materialize_preset("tiny-llama", tmp_path)
    assert path == tmp_path / "tiny-llama"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(path))
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert materialize_preset("tiny-llama", tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert os.listdir(tmp_path) == ["tiny-llama"]  # no temporary folders left behind


def test_materialize_concurrent_writers_agree(tmp_path):
    results, errors = [], []

    def work():
        try:
            results.append(materialize_preset("tiny-gpt2", tmp_path))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert os.listdir(tmp_path) == ["tiny-gpt2"]
    assert isinstance(load_model(str(results[0])), tf.GPT2LMHeadModel)


def test_materialize_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "tiny-llama").mkdir()
    (tmp_path / "tiny-llama" / "mine.txt").write_text("user data")
    with pytest.raises(ModelLoadError, match="not a materialized preset"):
        materialize_preset("tiny-llama", tmp_path)
    assert (tmp_path / "tiny-llama" / "mine.txt").exists()


@pytest.mark.parametrize("layout", ["v2 marker", "no processor"])
def test_materialize_replaces_an_outdated_preset_folder(tmp_path, layout):
    """Ours but outdated: an earlier layout (Qwen's image token spelled <image>), or a Qwen-VL folder saved where
    torchvision was missing (its tokenizer alone). Either is rebuilt with the processor once it can be built."""
    path = tmp_path / "tiny-qwen2-vl"
    path.mkdir()
    (path / "old-weights.bin").write_text("x")
    (path / (".freezetune-complete-v2" if layout == "v2 marker" else ".freezetune-complete-v3")).write_text("")
    assert materialize_preset("tiny-qwen2-vl", tmp_path) == path
    assert not (path / "old-weights.bin").exists()
    assert isinstance(load_processor(str(path)), tf.Qwen2VLProcessor)
    assert os.listdir(tmp_path) == ["tiny-qwen2-vl"]


def test_tiny_llama_loads_through_from_pretrained(model_dirs):
    path = model_dirs["tiny-llama"]
    model, tok = load_model(path), load_processor(path)
    assert isinstance(model, tf.LlamaForCausalLM)
    assert isinstance(tok, tf.PreTrainedTokenizerBase) and tok.pad_token_id == 0
    # the saved weights are the preset's, seed 0
    fresh = presets.build_preset("tiny-llama", seed=0)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    batch = tok(["12+7=19"], return_tensors="pt")
    assert torch.isfinite(model(**batch, labels=batch["input_ids"]).loss)


def test_tiny_llava_processor_expands_image_token_for_the_model(model_dirs):
    path = model_dirs["tiny-llava"]
    model, proc = load_model(path), load_processor(path)
    assert isinstance(model, tf.LlavaForConditionalGeneration)
    assert isinstance(proc, tf.LlavaProcessor)
    assert proc.image_processor.crop_size == {"height": presets.IMAGE_SIZE, "width": presets.IMAGE_SIZE}
    assert proc.image_token == IMAGE_TOKEN and proc.image_token_id == model.config.image_token_index

    image = Image.new("RGB", (50, 40), (200, 30, 30))  # any size: the processor resizes to 32x32
    out = proc(images=[image], text=[f"{IMAGE_TOKEN}\nWhat is in the picture?"], return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, presets.IMAGE_SIZE, presets.IMAGE_SIZE)
    n_slots = int((out["input_ids"] == proc.image_token_id).sum())
    with torch.no_grad():
        features = model.get_image_features(pixel_values=out["pixel_values"]).pooler_output
    assert n_slots == features[0].shape[0] == 17  # 4x4 patches + CLS ("full" feature selection)
    loss = model(**out, labels=out["input_ids"]).loss
    assert torch.isfinite(loss)


def test_model_classes_follow_the_config(tmp_path):
    bert = load_model(resolve_model_path("tiny-bert", tmp_path))
    assert isinstance(bert, tf.BertForSequenceClassification) and bert.config.num_labels == 2
    assert is_vlm_config(presets.tiny_llava()) and is_vlm_config(presets.tiny_idefics3())
    assert not is_vlm_config(presets.tiny_llama()) and not is_vlm_config(presets.tiny_bert())


def test_vlm_without_processor_falls_back_to_tokenizer(tmp_path, caplog):
    """A VLM checkpoint saved with its tokenizer and no processor files (as some training scripts leave them) loads
    its tokenizer, with a warning, instead of failing inside AutoProcessor."""
    folder = tmp_path / "qwen2-vl-no-processor"
    presets.build_preset("tiny-qwen2-vl").save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    with caplog.at_level(logging.WARNING):
        proc = load_processor(str(folder))
    assert isinstance(proc, tf.PreTrainedTokenizerBase)
    assert "tokenizer only" in caplog.text


@pytest.mark.parametrize("preset, processor_class, patch", [
    ("tiny-qwen2-vl", "Qwen2VLProcessor", 4), ("tiny-qwen3-vl", "Qwen3VLProcessor", 16)])
def test_qwen_vl_presets_have_their_real_processor(tmp_path, materialize_vlm, preset, processor_class, patch):
    """Dynamic resolution: each image becomes (patches, 3 * 2 * p * p) rows and a (t, h, w) grid, h and w following
    its size; the processor writes one image token per 2x2 merged patches, the count the model's encoder returns."""
    path = materialize_vlm(preset, tmp_path)
    model, proc = load_model(path), load_processor(path)
    assert type(proc).__name__ == processor_class
    assert proc.image_token_id == model.config.image_token_id == presets.VOCAB_SIZE - 1
    images = [Image.new("RGB", (2 * patch * 2, patch * 2), "red"), Image.new("RGB", (patch * 2, 4 * patch * 2), "blue")]
    text = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}],
                                     tokenize=False)] * 2
    out = proc(text=text, images=[[images[0]], [images[1]]], return_tensors="pt", padding=True)
    assert out["image_grid_thw"].tolist() == [[1, 2, 4], [1, 8, 2]]  # (t, h, w) in patches: 1 frame, rows x columns
    assert out["pixel_values"].shape == (8 + 16, 3 * 2 * patch * patch)
    assert (out["input_ids"] == proc.image_token_id).sum(dim=1).tolist() == [2, 4]  # patches / (2 x 2)
    loss = model(**out, labels=out["input_ids"]).loss
    assert torch.isfinite(loss)


def test_resolve_model_path(tmp_path, model_dirs):
    assert resolve_model_path("tiny-llama", tmp_path) == str(tmp_path / "tiny-llama")
    assert resolve_model_path(model_dirs["tiny-llava"], tmp_path) == model_dirs["tiny-llava"]
    assert resolve_model_path("some-org/some-model", tmp_path) == "some-org/some-model"
    with pytest.raises(ModelLoadError, match="no such folder"):
        resolve_model_path(str(tmp_path / "missing" / "model"), tmp_path)


def test_hub_name_offline_gives_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries in tests
    with pytest.raises(ModelLoadError, match=r"model `some-org/some-model`: not a built-in preset \(tiny-llama.*hub"):
        load_model("some-org/some-model")


def test_trust_remote_code_warns(model_dirs, caplog):
    with caplog.at_level(logging.WARNING):
        load_model(model_dirs["tiny-llama"], trust_remote_code=True)
    assert "trust_remote_code=True" in caplog.text


def test_dtype_is_passed_through(model_dirs):
    model = load_model(model_dirs["tiny-llama"], dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
