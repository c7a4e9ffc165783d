"""A byte-level tokenizer built locally (no download) for the built-in tiny presets.

Layout of the 384 ids (``presets.VOCAB_SIZE``):
    0 <pad>   1 <s> (bos)   2 </s> (eos)   3 <unk>
    4..259    the 256 bytes (GPT-2 byte-to-unicode alphabet, so any UTF-8 text round-trips)
    260..377  <|reserved_N|>  (never produced by encoding; room for later specials)
    378..382  named multimodal specials (Idefics3 / Qwen2-VL style), unused by tiny-llava
    383       <image>   (= presets.tiny_llava().image_token_index)

bos/eos ids 1/2 match the Llama-family config defaults used by the presets.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from pipelines.models.presets import VOCAB_SIZE

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = VOCAB_SIZE - 1
# Ids 378..382 carry names other VLM families expect; their presets point at 380..383.
_NAMED_TAIL = ["<global-img>", "<fake_token_around_image>", "<|vision_end|>", "<|vision_start|>", "<|video_pad|>"]
_FIRST_BYTE_ID = 4


def _vocab() -> dict[str, int]:
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK])}
    # One token per byte, spelled in the ByteLevel pre-tokenizer's alphabet.
    for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)):
        vocab[ch] = _FIRST_BYTE_ID + i
    first_named = IMAGE_TOKEN_ID - len(_NAMED_TAIL)
    for i in range(len(vocab), first_named):
        vocab[f"<|reserved_{i}|>"] = i
    for i, tok in enumerate(_NAMED_TAIL):
        vocab[tok] = first_named + i
    vocab[IMAGE_TOKEN] = IMAGE_TOKEN_ID
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


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Returns a ``PreTrainedTokenizerFast`` over bytes: bos is prepended by ``add_special_tokens``, eos is not.

    ``<image>`` encodes to the single id 383; every other string encodes to its UTF-8 bytes.
    """
    vocab = _vocab()
    # BPE with no merges = one token per byte; multi-character vocab entries are only reachable
    # as added (special) tokens, which the tokenizer matches before byte splitting.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    specials = [PAD, BOS, EOS, UNK, IMAGE_TOKEN, *_NAMED_TAIL]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=[IMAGE_TOKEN, *_NAMED_TAIL],
        model_input_names=["input_ids", "attention_mask"],
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    missing = [t for t in specials if tok.convert_tokens_to_ids(t) != vocab[t]]
    assert not missing, f"special tokens got new ids: {missing}"
    assert len(tok) == VOCAB_SIZE, len(tok)
    return tok
