"""Models: tiny presets built from transformers configs, their byte tokenizer, and loading."""
