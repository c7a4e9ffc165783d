"""Model and processor loading: built-in presets, local folders and hub names through one path.

A preset is first *materialized* (built from its config, saved with ``save_pretrained``
next to its tokenizer/processor), so that training always goes through the real
``from_pretrained`` code, exactly as it would for a hub model or a local checkpoint.
"""

from __future__ import annotations

import difflib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from pipelines.config import paths
from pipelines.models import presets
from pipelines.models.tokenizer import IMAGE_TOKEN, QWEN_IMAGE_TOKEN, build_byte_tokenizer, chat_template

log = logging.getLogger(__name__)

_COMPLETE = ".freezetune-complete-v3"  # written last, so a folder that has it is whole; v3: Qwen's <|image_pad|>
# older layouts of ours: no chat template, no Qwen2-VL / Idefics3 processor (v1); Qwen's image token as <image> (v2)
_STALE = (".freezetune-complete", ".freezetune-complete-v2")
MATERIALIZE_SEED = 0


class ModelLoadError(OSError):
    """A model spec could not be resolved or loaded; the message says what was tried."""


# ---------------------------------------------------------------- presets
def _tiny_llava_processor(model_config):
    """A real ``LlavaProcessor`` matched to the model's vision tower and feature selection."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vision = model_config.vision_config
    # The PIL backend: the default (fast) CLIP image processor needs torchvision.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
    )
    # CLIP's vision embeddings prepend a CLS token. With vision_feature_select_strategy
    # "full" the model keeps it, so each image fills (32/8)**2 + 1 = 17 <image> slots;
    # with "default" the processor itself subtracts the CLS again.
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_byte_tokenizer(),
        patch_size=vision.patch_size,
        vision_feature_select_strategy=model_config.vision_feature_select_strategy,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
        chat_template=chat_template(IMAGE_TOKEN),
    )


def _tiny_idefics3_processor(model_config):
    """A real ``Idefics3Processor``: an image longer than the model's 32-pixel input is split into 32-pixel tiles
    (plus the whole image, downscaled), so images of different sizes give different tile counts."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    side = model_config.vision_config.image_size
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=True, size={"longest_edge": 2 * side},
                                                max_image_size={"longest_edge": side})
    tokens = (side // model_config.vision_config.patch_size) ** 2 // model_config.scale_factor**2
    return Idefics3Processor(image_processor=image_processor, tokenizer=build_byte_tokenizer(), image_seq_len=tokens,
                             chat_template=chat_template(IMAGE_TOKEN))


def _tiny_qwen_vl_processor(processor_class: str, video_processor_class: str):
    """A real ``Qwen2VLProcessor`` / ``Qwen3VLProcessor`` (dynamic resolution: patches x (3 * 2 * p * p) rows and a
    (t, h, w) grid per image), or None without torchvision: transformers builds the family's processors only with
    their video processor, which needs it."""

    def build(model_config):
        import transformers
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        vision = model_config.vision_config
        kw = dict(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                  temporal_patch_size=vision.temporal_patch_size)
        try:
            video = getattr(transformers, video_processor_class)(**kw)
        except (ImportError, AttributeError, ValueError) as err:
            log.warning("%s: no processor (%s: %s); install torchvision (the version matching torch) for "
                        "image-text data.", model_config.model_type, type(err).__name__, err)
            return None
        # 1..16 merged image tokens per image: sides of 1..4 merge units of (patch x merge) pixels
        unit = vision.patch_size * vision.spatial_merge_size
        image_processor = Qwen2VLImageProcessorPil(min_pixels=unit * unit, max_pixels=16 * unit * unit, **kw)
        placeholder = "<|vision_start|>" + QWEN_IMAGE_TOKEN + "<|vision_end|>"
        return getattr(transformers, processor_class)(
            image_processor=image_processor, video_processor=video,
            tokenizer=build_byte_tokenizer(placeholder, image_token=QWEN_IMAGE_TOKEN),
            chat_template=chat_template(placeholder))

    return build


_PRESET_PROCESSORS = {"tiny-llava": _tiny_llava_processor, "tiny-idefics3": _tiny_idefics3_processor,
                      "tiny-qwen2-vl": _tiny_qwen_vl_processor("Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
                      "tiny-qwen3-vl": _tiny_qwen_vl_processor("Qwen3VLProcessor", "Qwen3VLVideoProcessor")}


def _align_special_ids(model, tokenizer) -> None:
    """Point the config's bos/eos/pad ids at the byte tokenizer the preset is saved with.

    Some preset configs keep their family's hub ids (GPT-2 50256, Qwen 151643), which lie
    outside the 384-token vocabulary.
    """
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    configs = {id(c): c for c in (model.config, model.config.get_text_config(), getattr(model, "generation_config", None)) if c is not None}
    for config in configs.values():
        for key, value in ids.items():
            setattr(config, key, value)


def materialize_preset(name: str, root: str | Path) -> Path:
    """Returns ``root/name``: the preset model saved with ``save_pretrained`` plus its tokenizer or processor.

    VLM presets get their family's real processor (byte tokenizer + the family's image processor, PIL backend):
    ``LlavaProcessor``, ``Idefics3Processor`` (image splitting into tiles), ``Qwen2VLProcessor`` and
    ``Qwen3VLProcessor`` (dynamic resolution; only where torchvision is installed, else the tokenizer alone).
    Every tokenizer and processor has the presets' ChatML-like chat template, rendering an image part as the
    family's image placeholder.

    Idempotent and safe under concurrency: the folder is built in a temporary sibling
    and renamed into place, so a reader sees either nothing or a complete folder.
    """
    if name not in presets.PRESETS:
        raise KeyError(f"unknown preset {name!r}; built-in presets: {', '.join(presets.PRESETS)}")
    root = Path(root)
    target = root / name
    if (target / _COMPLETE).exists() and not _outdated(name, target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        model = presets.build_preset(name, seed=MATERIALIZE_SEED)
        _align_special_ids(model, build_byte_tokenizer())
        model.save_pretrained(tmp)
        make = _PRESET_PROCESSORS.get(name)
        processor = make(model.config) if make else None
        (processor or build_byte_tokenizer()).save_pretrained(tmp)
        (tmp / _COMPLETE).write_text(name + "\n")
        if _outdated(name, target):
            _retire(target)  # ours, but an older layout or without the processor: replaced, not trusted
        if target.exists() and not (target / _COMPLETE).exists():
            # Not written by us (our folders appear whole, marker included): never delete it.
            raise ModelLoadError(f"preset `{name}`: {target} exists but is not a materialized preset; "
                                 "move it away or use another cache folder.")
        try:
            os.rename(tmp, target)
        except OSError:
            # Another worker renamed its copy first; theirs is equally good.
            if not (target / _COMPLETE).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _outdated(name: str, target: Path) -> bool:
    """An earlier layout of ours, or a Qwen-VL preset saved without its processor (torchvision was missing) where
    transformers can build that processor now."""
    from transformers.utils import is_torchvision_available

    if not (target / _COMPLETE).exists():
        return any((target / m).exists() for m in _STALE)
    return name in _PRESET_PROCESSORS and not _has_processor_files(target) and is_torchvision_available()


def _retire(folder: Path) -> None:
    """Moves an outdated preset folder aside and deletes it (a reader holding it open keeps its files)."""
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
    try:
        os.rename(folder, aside / folder.name)
    except OSError:
        pass  # another worker retired it first
    shutil.rmtree(aside, ignore_errors=True)


def resolve_model_path(spec: str, cache_root: str | Path | None = None) -> str:
    """Returns a path or name for ``from_pretrained``.

    A preset name → its materialized folder ``cache_root/<name>`` (default: ``models/`` under the
    project's one cache root, ``pipelines.config.paths.cache_root``); an existing
    local folder → itself; anything else → returned unchanged as a hub name (loading
    it fails with a clear message when the hub cannot be reached).
    """
    if spec in presets.PRESETS:
        root = Path(cache_root) if cache_root is not None else paths.cache_root() / "models"
        return str(materialize_preset(spec, root))
    if os.path.isdir(spec):
        return spec
    _refuse_preset_typo(spec)
    if os.path.sep in spec and (spec.startswith((".", os.path.sep, "~")) or spec.count("/") > 1):
        # Looks like a path, not "org/name": say so instead of asking the hub.
        raise ModelLoadError(f"model `{spec}`: no such folder (looked at {os.path.abspath(os.path.expanduser(spec))}); "
                             f"give a folder saved with save_pretrained, or use a built-in preset: "
                             f"{', '.join(presets.PRESETS)}.")
    return spec


def _refuse_preset_typo(spec: str) -> None:
    """A name one letter off a preset (`tiny-lama`) is a typo, not a hub model: say so instead of waiting on
    the hub. Hub names are "org/name" or well known single words, never this close to a preset."""
    close = difflib.get_close_matches(spec, list(presets.PRESETS), 1, cutoff=0.85)
    if "/" not in spec and close:
        raise ModelLoadError(f"model `{spec}`: no such preset or folder (did you mean `{close[0]}`?); built-in "
                             f"presets: {', '.join(presets.PRESETS)}.")


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


def check_weights(folder: str | Path) -> None:
    """A model folder has weights, and every safetensors file in it is whole: its header parses and the file
    is as long as the header says (a truncated download). Reads headers only: seconds for any size."""
    import json
    import struct

    folder = Path(folder)
    files = sorted({f for pattern in WEIGHT_FILES for f in folder.glob(pattern)})
    if not files:
        raise ModelLoadError(f"model folder {folder}: no weights (*.safetensors or pytorch_model.bin); give a folder "
                             "saved with save_pretrained (config.json alone is enough for `freezetune plan` only).")
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError) as err:
            raise ModelLoadError(f"{index}: not a readable weight index ({err}); replace it: download the model again.") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ModelLoadError(f"{index}: shard(s) {missing} are missing; replace it: download the model again.")
    for file in files:
        if file.suffix != ".safetensors":
            continue
        size = file.stat().st_size
        try:
            with open(file, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                if length > size - 8:
                    raise ValueError(f"a {length}-byte header in a {size}-byte file")
                header = json.loads(fh.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (struct.error, ValueError, KeyError, TypeError, IndexError) as err:
            raise ModelLoadError(f"{file}: corrupt safetensors file ({err}); replace the file: download or save the model again.") from None
        if 8 + length + end != size:
            raise ModelLoadError(f"{file}: corrupt safetensors file ({size} bytes, its header describes "
                                 f"{8 + length + end}: truncated?); replace the file: download or save the model again.")


def _hub_error(spec: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"model `{spec}`: not a built-in preset ({', '.join(presets.PRESETS)}), not a local folder, "
        f"and the hub cannot be reached or has no such model ({type(err).__name__}: {err}). "
        "Use a preset, a folder saved with save_pretrained, or download the model on a machine with access."
    )


def _from_pretrained(loader, path: str, **kw):
    if os.path.isfile(path):
        raise ModelLoadError(f"model `{path}` is a file; give the folder that holds it with its config.json.")
    try:
        return loader.from_pretrained(path, **kw)
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError) and loader.__name__ != "AutoConfig":
            raise  # e.g. an attention kernel that is not installed: its own message says what to do
        if os.path.isdir(path):
            raise ModelLoadError(f"model folder {path}: {loader.__name__} cannot read it ({err}); fix its "
                                 "config.json or save the model again with save_pretrained.") from None
        raise _hub_error(path, err) from err


# ---------------------------------------------------------------- loading
def is_vlm_config(config) -> bool:
    """True when the config describes a vision-language model (it has a ``vision_config``)."""
    return getattr(config, "vision_config", None) is not None


def _model_class(config):
    import transformers as tf

    if is_vlm_config(config):
        return tf.AutoModelForImageTextToText
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return tf.AutoModelForSequenceClassification
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return tf.AutoModelForCausalLM
    # No saved architecture: decoder-only configs have a causal-LM class; encoder-only
    # ones (BERT-like, with token types) are used as sequence classifiers.
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not hasattr(config, "type_vocab_size"):
        return tf.AutoModelForCausalLM
    return tf.AutoModelForSequenceClassification


def read_config(path: str, trust_remote_code: bool = False):
    """The model's transformers config (config.json only: no weights)."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, path, trust_remote_code=trust_remote_code)


def classifier_labels(config) -> int | None:
    """How many classes the model's head has when it loads as a sequence classifier; None for an LM head."""
    import transformers as tf

    return int(config.num_labels) if _model_class(config) is tf.AutoModelForSequenceClassification else None


def max_positions(config) -> int | None:
    """Positions the language model has (absolute or the RoPE length it was trained to); None if unknown."""
    text = config.get_text_config()
    value = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    return int(value) if value else None


def load_model(path: str, trust_remote_code: bool = False, dtype=None, attn_implementation: str | None = None):
    """Returns the model at ``path`` (folder or hub name) as the matching Auto class, in ``dtype`` (default:
    as stored) with ``attn_implementation`` (default: transformers' choice).

    VLM configs → ``AutoModelForImageTextToText``, causal LMs → ``AutoModelForCausalLM``,
    BERT-like classifiers → ``AutoModelForSequenceClassification``.
    """
    from transformers import AutoConfig

    if trust_remote_code:
        log.warning("model `%s`: trust_remote_code=True runs Python code shipped with the model; "
                    "only use it for sources you trust.", path)
    if os.path.isdir(path):
        check_weights(path)  # a clear error, not one from deep inside from_pretrained
    config = _from_pretrained(AutoConfig, path, trust_remote_code=trust_remote_code)
    cls = _model_class(config)
    kw = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kw["dtype"] = dtype
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    return _from_pretrained(cls, path, config=config, **kw)


def meta_model(spec: str, trust_remote_code: bool = False, attn_implementation: str | None = None):
    """The model's architecture on the meta device: no weights read or allocated, so a 70B config folder
    (config.json alone) builds in seconds. ``spec``: a preset name, a folder or a hub name."""
    import torch
    from transformers import AutoConfig

    if spec in presets.PRESETS:
        with torch.device("meta"):
            return presets.build_preset(spec, seed=None)
    if not os.path.isdir(spec):
        _refuse_preset_typo(spec)
    config = _from_pretrained(AutoConfig, spec, trust_remote_code=trust_remote_code)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        return _model_class(config).from_config(config, trust_remote_code=trust_remote_code, **extra)


def load_processor(path: str, trust_remote_code: bool = False):
    """Returns ``AutoProcessor`` for a VLM, ``AutoTokenizer`` for a text model.

    A VLM folder that holds only a tokenizer (a checkpoint saved without its processor; ``tiny-qwen2-vl`` and
    ``tiny-qwen3-vl`` materialized without torchvision) falls back to its tokenizer, with a warning: such a model
    can then train on text only.
    """
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    config = _from_pretrained(AutoConfig, path, trust_remote_code=trust_remote_code)
    if not is_vlm_config(config):
        return _from_pretrained(AutoTokenizer, path, trust_remote_code=trust_remote_code)
    if os.path.isdir(path) and not _has_processor_files(Path(path)):
        log.warning("model `%s`: no image processor saved in the folder; loading its tokenizer only.", path)
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return _from_pretrained(AutoProcessor, path, trust_remote_code=trust_remote_code)


def _has_processor_files(folder: Path) -> bool:
    return any((folder / f).exists() for f in ("processor_config.json", "preprocessor_config.json"))
