"""Built-in tiny models, built from transformers configs (no downloads).

Each preset is a real transformers architecture at toy size: the same code
paths as a hub model, small enough to train on two CPU cores. ``tiny-llava``
is the embedded default VLM.
"""

from __future__ import annotations

from typing import Callable

import transformers as tf

VOCAB_SIZE = 384  # fits the project's byte-level demo tokenizer (256 bytes + specials), see pipelines.tokenizer
IMAGE_SIZE = 32


def _llama_text(**kw) -> dict:
    base = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return base


def tiny_llama() -> tf.PretrainedConfig:
    return tf.LlamaConfig(**_llama_text())


def tiny_qwen2() -> tf.PretrainedConfig:
    return tf.Qwen2Config(**_llama_text())


def tiny_mistral() -> tf.PretrainedConfig:
    return tf.MistralConfig(**_llama_text())


def tiny_gpt2() -> tf.PretrainedConfig:
    return tf.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=4, n_head=4, n_positions=256)


def tiny_bert() -> tf.PretrainedConfig:
    return tf.BertConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=256, num_labels=2,
    )


def tiny_llava() -> tf.PretrainedConfig:
    vision = tf.CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=8, projection_dim=48,
    )
    return tf.LlavaConfig(
        vision_config=vision,
        text_config=tf.LlamaConfig(**_llama_text()),
        image_token_index=VOCAB_SIZE - 1,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_seq_length=(IMAGE_SIZE // 8) ** 2,
        tie_word_embeddings=False,
    )


def tiny_qwen2_vl() -> tf.PretrainedConfig:
    text = _llama_text(rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]})
    return tf.Qwen2VLConfig(
        text_config=text,
        vision_config=dict(depth=2, embed_dim=48, hidden_size=64, num_heads=4, mlp_ratio=2,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=VOCAB_SIZE - 1,
        video_token_id=VOCAB_SIZE - 2,
        vision_start_token_id=VOCAB_SIZE - 3,
        vision_end_token_id=VOCAB_SIZE - 4,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_qwen3_vl() -> tf.PretrainedConfig:
    # Qwen3-VL: 16-px patches (as the hub's), a learned position grid, and DeepStack: the merged features of
    # vision blocks 0 and 1 are also added to the LLM's hidden states after its first two layers
    text = _llama_text(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 5e5,
                                                     "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    return tf.Qwen3VLConfig(
        text_config=text,
        vision_config=dict(depth=2, hidden_size=48, intermediate_size=96, num_heads=4, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                           num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
        image_token_id=VOCAB_SIZE - 1,
        video_token_id=VOCAB_SIZE - 2,
        vision_start_token_id=VOCAB_SIZE - 3,
        vision_end_token_id=VOCAB_SIZE - 4,
    )


def tiny_idefics3() -> tf.PretrainedConfig:
    return tf.Idefics3Config(
        text_config=dict(model_type="llama", **_llama_text()),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8),
        scale_factor=2,
        image_token_id=VOCAB_SIZE - 1,
    )


# name -> (config, transformers class name): a class is looked up only when that preset is built, so
# importing this module does not import the 8 model families' code (seconds: `freezetune plan` needs none)
PRESETS: dict[str, tuple[Callable[[], tf.PretrainedConfig], str]] = {
    "tiny-llama": (tiny_llama, "LlamaForCausalLM"),
    "tiny-qwen2": (tiny_qwen2, "Qwen2ForCausalLM"),
    "tiny-mistral": (tiny_mistral, "MistralForCausalLM"),
    "tiny-gpt2": (tiny_gpt2, "GPT2LMHeadModel"),
    "tiny-bert": (tiny_bert, "BertForSequenceClassification"),
    "tiny-llava": (tiny_llava, "LlavaForConditionalGeneration"),
    "tiny-qwen2-vl": (tiny_qwen2_vl, "Qwen2VLForConditionalGeneration"),
    "tiny-qwen3-vl": (tiny_qwen3_vl, "Qwen3VLForConditionalGeneration"),
    "tiny-idefics3": (tiny_idefics3, "Idefics3ForConditionalGeneration"),
}


def build_preset(name: str, seed: int | None = 0):
    """A freshly initialised tiny model (deterministic for a given seed)."""
    import torch

    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; built-in presets: {', '.join(PRESETS)}")
    make_config, class_name = PRESETS[name]
    if seed is not None:
        torch.manual_seed(seed)
    return getattr(tf, class_name)(make_config())
