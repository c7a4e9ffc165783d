"""`freezetune plan` / `strategies` on a folder that holds only config.json: the plan is built on the meta
device (no weights read), with per-GPU bytes and an activation estimate for every VLM strategy."""

from __future__ import annotations

import json

import transformers as tf

from pipelines.cli.main import run


def _config_only_llava(folder) -> None:
    """LLaVA-1.5-7B's architecture (Llama-2-7B + CLIP ViT-L/14-336), as config.json alone."""
    vision = tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                 num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = tf.LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32)
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=576)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.save_pretrained(folder)


def test_plan_of_a_7b_vlm_from_its_config_alone(tmp_path, capsys):
    _config_only_llava(tmp_path)
    assert [f.name for f in tmp_path.iterdir()] == ["config.json"]
    assert run(["strategies", "--model", str(tmp_path), "--json", "--batch-size", "4", "--length", "1024",
                "--activation-checkpointing"]) == 0
    plans = {s["letter"]: s for s in json.loads(capsys.readouterr().out) if s["letter"]}
    assert sorted(plans) == ["A", "B", "C", "D", "E"]
    gib = {k: s["memory"]["total_bytes"] / 2**30 for k, s in plans.items()}
    frozen_llm = 6.6e9 * 2 / 2**30  # a frozen 7B language model in bf16: ~12.4 GiB, not twice that
    for letter in "ABC":
        assert frozen_llm < gib[letter] < 15, gib  # fits a 24 GB A10G with checkpointed activations
    assert gib["D"] > 80 and gib["E"] > gib["D"]  # full fine-tuning does not fit one 80 GB GPU (16 B/param)
    e = plans["E"]["memory"]
    assert e["weights_bytes"] == e["grads_bytes"] == 4 * plans["E"]["total_params"]
    assert e["optimizer_bytes"] > 8 * plans["E"]["total_params"]  # + a 4-byte AdamW step per tensor
    acts = {k: s["memory"]["activations"] for k, s in plans.items()}
    assert all(a["checkpointing"] and a["blocks_kept"] == 32 for a in acts.values())  # the connector trains
    assert acts["C"]["vision_bytes"] > 0 and acts["A"]["vision_bytes"] == 0  # frozen vision keeps nothing


def test_activation_estimate_counts_only_blocks_backward_enters(tmp_path, capsys):
    _config_only_llava(tmp_path)

    def estimate(*flags):
        assert run(["plan", "--model", str(tmp_path), "--json", "--batch-size", "2", "--length", "512", *flags]) == 0
        return json.loads(capsys.readouterr().out)["memory"]["activations"]

    top_k = estimate("--strategy", "top_k", "--top-k", "8")
    checkpointed = estimate("--strategy", "top_k", "--top-k", "8", "--activation-checkpointing")
    full = estimate("--strategy", "vision_frozen_llm_full")
    assert top_k["blocks_kept"] == 32  # top_k trains the connector too: image features need a gradient
    assert checkpointed["activations_bytes"] < top_k["activations_bytes"] / 5
    # every block keeps activations either way; the 24 frozen ones top_k passes through keep no linear inputs
    assert (top_k["blocks_trained"], full["blocks_trained"]) == (8, 32)
    assert 0.6 * full["language_bytes"] < top_k["language_bytes"] < 0.8 * full["language_bytes"]


def test_frozen_lower_blocks_keep_no_activations(capsys):
    def kept(*flags):
        assert run(["plan", "--model", "tiny-llama", "--json", "--batch-size", "2", "--length", "64", *flags]) == 0
        return json.loads(capsys.readouterr().out)["memory"]["activations"]

    assert kept("--strategy", "top_k", "--top-k", "1")["blocks_kept"] == 1
    assert kept("--strategy", "top_k", "--top-k", "3")["blocks_kept"] == 3
    assert kept("--strategy", "feature_extraction")["language_bytes"] == 0  # only the logits
    assert kept("--strategy", "full")["blocks_kept"] == 4  # trained embeddings: every block
