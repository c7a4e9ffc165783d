"""A byte-level tokenizer built locally (no download) for the built-in tiny presets.

Layout of the 384 ids (``presets.VOCAB_SIZE``):
    0 <pad>   1 <s> (bos)   2 </s> (eos)   3 <unk>
    4..259    the 256 bytes (GPT-2 byte-to-unicode alphabet, so any UTF-8 text round-trips)
    260..338  <|reserved_N|>  (never produced by encoding; room for later specials)
    339..375  <row_R_col_C> (R, C in 1..6) and <end_of_utterance>: Idefics3's tile and turn tokens
    376..377  <|im_start|> <|im_end|>  (turn markers of the presets' ChatML-like chat template)
    378..382  named multimodal specials (Idefics3 / Qwen2-VL style), unused by tiny-llava
    383       <image>   (= presets.tiny_llava().image_token_index); spelled <|image_pad|> for the Qwen-VL presets,
              as the family's hub tokenizers spell it (their processors look for that name)

bos/eos ids 1/2 match the Llama-family config defaults used by the presets.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from pipelines.models.presets import VOCAB_SIZE

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
IMAGE_TOKEN = "<image>"
QWEN_IMAGE_TOKEN = "<|image_pad|>"
IMAGE_TOKEN_ID = VOCAB_SIZE - 1
# Ids 378..382 carry names other VLM families expect; their presets point at 380..383.
_NAMED_TAIL = ["<global-img>", "<fake_token_around_image>", "<|vision_end|>", "<|vision_start|>", "<|video_pad|>"]
_CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]  # the chat template's turn markers; <|im_end|> ends a turn
# Idefics3's processor writes a tile's position as <row_R_col_C> and adds <end_of_utterance>: in the vocabulary,
# so that it finds them instead of growing the tokenizer past the model's embeddings
_IDEFICS3_TOKENS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)] + ["<end_of_utterance>"]
_FIRST_BYTE_ID = 4


def chat_template(image: str = IMAGE_TOKEN) -> str:
    """A ChatML-like Jinja chat template for the presets: ``image`` is what an image part renders as (the
    family's placeholder, which its processor expands to the image's tokens)."""
    return (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{- '" + image + "' -}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


def _vocab(image_token: str = IMAGE_TOKEN) -> dict[str, int]:
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK])}
    # One token per byte, spelled in the ByteLevel pre-tokenizer's alphabet.
    for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)):
        vocab[ch] = _FIRST_BYTE_ID + i
    first_named = IMAGE_TOKEN_ID - len(_NAMED_TAIL)
    middle = _IDEFICS3_TOKENS + _CHAT_TOKENS
    first_middle = first_named - len(middle)
    for i in range(len(vocab), first_middle):
        vocab[f"<|reserved_{i}|>"] = i
    for i, tok in enumerate(middle):
        vocab[tok] = first_middle + i
    for i, tok in enumerate(_NAMED_TAIL):
        vocab[tok] = first_named + i
    vocab[image_token] = IMAGE_TOKEN_ID
    assert len(vocab) == VOCAB_SIZE and sorted(vocab.values()) == list(range(VOCAB_SIZE))
    return vocab


def _byte_of(ch: str) -> int:
    # Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256+k.
    return _BYTE_OF[ch]


def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_OF = {ch: b for b, ch in _bytes_to_unicode().items()}


def build_byte_tokenizer(image_placeholder: str = IMAGE_TOKEN,
                         image_token: str = IMAGE_TOKEN) -> PreTrainedTokenizerFast:
    """Returns a ``PreTrainedTokenizerFast`` over bytes: bos is prepended by ``add_special_tokens``, eos is not.

    ``image_token`` encodes to the single id 383; every other string encodes to its UTF-8 bytes. Its chat template
    (:func:`chat_template`) renders an image part as ``image_placeholder``.
    """
    vocab = _vocab(image_token)
    # BPE with no merges = one token per byte; multi-character vocab entries are only reachable
    # as added (special) tokens, which the tokenizer matches before byte splitting.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    specials = [PAD, BOS, EOS, UNK, image_token, *_NAMED_TAIL, *_IDEFICS3_TOKENS, *_CHAT_TOKENS]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=[image_token, *_NAMED_TAIL, *_IDEFICS3_TOKENS, *_CHAT_TOKENS],
        model_input_names=["input_ids", "attention_mask"],
        padding_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=chat_template(image_placeholder),
    )
    missing = [t for t in specials if tok.convert_tokens_to_ids(t) != vocab[t]]
    assert not missing, f"special tokens got new ids: {missing}"
    assert len(tok) == VOCAB_SIZE, len(tok)
    return tok
