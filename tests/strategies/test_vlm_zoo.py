"""Part detection on every vision-language model type the installed transformers ships.

The zoo is ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`` (the image-text-to-text auto mapping): each type is
built from its default config, shrunk to two blocks per stack, on the meta device (no memory, no init), and
``find_parts`` must

- place every parameter in exactly one part (a partition, sizes included);
- agree with ``EXPECTED``: for each type, the module paths of its language block lists, its encoders and its
  connector, read off the transformers module tree (``print(model)``) and reviewed by hand, type by type;
- agree with two peers' hand-written registries where they cover the type: LLaMA-Factory
  ``src/llamafactory/model/model_utils/visual.py`` (``COMPOSITE_MODELS``: vision tower keys, projector key,
  language model keys) and ms-swift ``swift/model/model_arch.py`` (``MultiModelKeys``: vision_tower, aligner,
  language_model, generator). There is no network here: ``LLAMA_FACTORY`` and ``MS_SWIFT`` were written from
  those files' conventions (their keys, their substring/prefix matching, the longer key winning where keys
  nest), for the families whose entries we know well, with their keys mapped onto transformers 5 module names.
  Where a peer's convention differs from ours, ``PEER_DIFFERENCES`` and ``PEER_GAPS`` say why, and the test
  checks that the difference is exactly that.

Types that cannot be built here are listed in ``NOT_BUILT`` with the reason, and the test checks the reason
still holds (it fails once they build, so the list cannot go stale).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import transformers as tf
from torch import nn
from transformers.models.auto import configuration_auto, modeling_auto

from strategies import StrategyConfigError, build_plan, find_parts
from strategies.parts import ENCODER_PARTS, part_of_unit

VLM_TYPES = sorted(modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

# --- building the zoo ---------------------------------------------------------------------------------------

# types whose vision tower is a timm model (`TimmWrapperModel`): building them needs `timm`, which freezetune does
# not depend on. The reason is checked below: if timm is installed they must build and are classified like the rest.
NOT_BUILT = {
    "fast_vlm": "its vision tower is a timm model (TimmWrapperModel); timm is not a freezetune dependency",
    "gemma3n": "its vision tower is a timm model (TimmWrapperModel, MobileNetV5); timm is not a freezetune dependency",
    "perception_lm": "its vision tower is a timm model (TimmWrapperModel); timm is not a freezetune dependency",
}
HAS_TIMM = importlib.util.find_spec("timm") is not None

LAYER_KEYS = ("num_hidden_layers", "num_layers", "depth", "n_layers", "n_layer", "encoder_layers", "decoder_layers",
              "num_encoder_layers", "num_decoder_layers", "layers")
PER_LAYER_KEYS = ("layer_types", "mlp_layer_types", "attn_layer_types")
# widths that must equal the language model's hidden size in a working checkpoint (a merger's output); some
# default configs mix sizes from different checkpoints (Qwen3-VL: text 4096, vision out_hidden_size 3584)
TEXT_WIDTH_KEYS = ("out_hidden_size", "output_dim", "text_hidden_size", "adapter_out_dim")

# constructor arguments for defaults that build no vision tower at all
CONFIG_KWARGS = {
    "gemma4": {"vision_config": {}, "audio_config": {}},
    "gemma4_unified": {"vision_config": {}, "audio_config": {}},
}
# defaults that cannot be constructed as shipped (None where the model needs a value, sizes that do not divide)
FIXES = {
    "aya_vision": {"vision_config.num_attention_heads": 16},  # 1152 is not divisible by the default 14 heads
    "chameleon": {"vocabulary_map": {"<image>": 3, "IMGIMGAAZ": 4}},  # default vocabulary_map is None
    "emu3": {"vocabulary_map": {"<image>": 3, "<|extra_200|>": 4, "<|visual token 000000|>": 5}},
    "cohere_compass": {"text_config.rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "deepseek_ocr2": {"text_config.mlp_layer_types": ["dense", "sparse"], "text_config.num_experts_per_tok": 2},
    "diffusion_gemma": {"text_config.num_experts": 4, "text_config.top_k_experts": 2,
                        "text_config.moe_intermediate_size": 256},
    "granite4_vision": {"downsample_rate": "1/4", "deepstack_layer_map": [[0, 0], [1, 1]]},
    "hunyuan_vl": {"text_config.head_dim": 128},
    "qwen4_exp": {"text_config.indexer_budget": 64, "text_config.indexer_compress_ratio": 4,
                  "text_config.indexer_n_heads": 4, "text_config.indexer_kv_heads": 1,
                  "text_config.indexer_head_dim": 64},
    # Qwen2-VL's vision `hidden_size` is its merger's output: the text width of the checkpoint
    "qwen2_vl": {"vision_config.hidden_size": 8192},
    # Llama 3.2 Vision: a language stack mixing self- and cross-attention layers, and a global vision transformer
    "mllama": {"text_config.num_hidden_layers": 4, "text_config.cross_attention_layers": [1, 3],
               "vision_config.num_global_layers": 2, "vision_config.intermediate_layers_indices": [0, 1]},
}


def _shrink(cfg, n: int = 2, seen: set | None = None):
    """Two blocks per stack; per-layer type lists keep the first two layers and one of each other kind."""
    seen = set() if seen is None else seen
    if id(cfg) in seen:
        return cfg
    seen.add(id(cfg))
    for value in list(vars(cfg).values()):
        if isinstance(value, tf.PretrainedConfig):
            _shrink(value, n, seen)
    count = None
    for key in LAYER_KEYS:
        value = vars(cfg).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > n:
            count = value
            setattr(cfg, key, n)
    lists = [key for key in PER_LAYER_KEYS if isinstance(vars(cfg).get(key), list) and len(vars(cfg)[key]) == count]
    if count and lists:  # keep the first n layers and the first layer of every other kind, in every such list
        keep = sorted(set(range(n)).union(*({vars(cfg)[k].index(kind) for kind in vars(cfg)[k]} for k in lists)))
        for key in lists:
            setattr(cfg, key, [vars(cfg)[key][i] for i in keep])
        for key in LAYER_KEYS:
            if vars(cfg).get(key) == n:
                setattr(cfg, key, len(keep))
    return cfg


def _consistent_widths(cfg):
    text = getattr(cfg, "text_config", None)
    width = getattr(text, "hidden_size", None)
    if isinstance(width, int):
        for name, sub in list(vars(cfg).items()):
            if isinstance(sub, tf.PretrainedConfig) and name != "text_config":
                for key in TEXT_WIDTH_KEYS:
                    if isinstance(vars(sub).get(key), int):
                        setattr(sub, key, width)
        for key in TEXT_WIDTH_KEYS:
            if isinstance(vars(cfg).get(key), int):
                setattr(cfg, key, width)
    return cfg


def tiny_config(model_type: str):
    cfg = configuration_auto.CONFIG_MAPPING[model_type](**CONFIG_KWARGS.get(model_type, {}))
    cfg = _consistent_widths(_shrink(cfg))
    for path, value in FIXES.get(model_type, {}).items():
        *head, last = path.split(".")
        target = cfg
        for h in head:
            target = getattr(target, h)
        setattr(target, last, value)
    return cfg


def build(model_type: str) -> nn.Module:
    cls = getattr(tf, modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type])
    with torch.device("meta"):
        return cls(tiny_config(model_type))


_ZOO: dict[str, tuple[nn.Module, object]] = {}


def zoo(model_type: str):
    """(model, parts), built once per session."""
    if model_type not in _ZOO:
        model = build(model_type)
        _ZOO[model_type] = (model, find_parts(model))
    return _ZOO[model_type]


BUILT = [t for t in VLM_TYPES if t not in NOT_BUILT or HAS_TIMM]


# --- what each type should be -----------------------------------------------------------------------------------


def _vlm(lang=("model.language_model.layers",), enc=None, conn=("model.multi_modal_projector",), other=()):
    """lang: the language block lists, lowest first; enc: encoder part -> module paths; conn: every module
    (or bare parameter) that is connector; other: modules no rule places."""
    return {"lang": list(lang), "enc": {"vision": ["model.vision_tower"]} if enc is None else enc,
            "conn": list(conn), "other": list(other)}


VISUAL = {"vision": ["model.visual"]}
EXPECTED = {
    # LLaVA family and its relatives: vision_tower / multi_modal_projector / language_model
    "aria": _vlm(),  # the projector is a cross-attention pooler
    "aya_vision": _vlm(),
    "cohere2_vision": _vlm(),  # SigLIP's pooling head stays in the vision tower
    "gemma3": _vlm(), "shieldgemma2": _vlm(),
    "got_ocr2": _vlm(), "pp_chart2table": _vlm(),  # SAM neck convolutions are vision; conv upsampler is projector
    "internvl": _vlm(), "qianfan_ocr": _vlm(),
    "lfm2_vl": _vlm(), "lfm3_vl": _vlm(),  # Siglip2: a linear patch embedding (noted)
    "llava": _vlm(), "vipllava": _vlm(), "minimax_m3_vl": _vlm(), "molmo2": _vlm(),
    "llava_next": _vlm(conn=["model.image_newline", "model.multi_modal_projector"]),
    "llava_next_video": _vlm(conn=["model.image_newline", "model.multi_modal_projector"]),
    "llava_onevision": _vlm(conn=["model.image_newline", "model.multi_modal_projector"]),
    "granite4_vision": _vlm(conn=["model.image_newline", "model.layerwise_projectors", "model.spatial_projectors"]),
    "mistral3": _vlm(), "mistral_large4": _vlm(),  # the patch merger lives in the projector
    "paligemma": _vlm(),
    "step3p7": _vlm(enc={"vision": ["model.vision_model"]}),  # its conv downsamplers stay in the vision model
    "kimi_k25": _vlm(conn=["model.mm_projector"]),
    "ovis2": _vlm(conn=["model.visual_embeddings_table"]),  # Ovis's visual embedding table (ms-swift: `vte` aligner)
    "deepseek_ocr2": _vlm(conn=["model.multi_modal_projector", "model.view_separator"]),
    "unlimited_ocr": _vlm(conn=["model.image_newline", "model.multi_modal_projector", "model.view_separator"]),
    "ernie4_5_vl_moe": _vlm(conn=["model.resampler_model"]),
    "hunyuan_vl": _vlm(conn=["model.vision_tower.patch_merger"]),
    "hy_v4_vl": _vlm(conn=["model.vision_tower.patch_merger"]),  # a merger made of convolutions only
    "inkling2": _vlm(conn=["model.vision_tower.merger"]),
    "inkling2_loop": _vlm(conn=["model.vision_tower.merger"]),
    "inkling_mm_model": _vlm(conn=["model.audio_tower"]),  # an audio-token embedding, no encoder: a leftover
    "minicpm_ocr": _vlm(conn=["model.merger"]),
    "minicpmv4_6": _vlm(conn=["model.merger"]),
    "minicpmv4_7": _vlm(conn=["model.merger"]),
    "muse_glimmer": _vlm(conn=["model.vision_adapter", "model.vision_projection"]),
    "muse_spark": _vlm(enc={"vision": ["model.vision_tower"], "audio": ["model.audio_tower"]},
                       conn=["model.audio_tower.proj", "model.vision_adapter", "model.vision_projection"]),
    "dots3_note": _vlm(enc={"vision": ["model.vision_tower"], "audio": ["model.audio_tower"]},
                       conn=["model.audio_tower.adapter", "model.vision_tower.merger"]),
    "gemma4": _vlm(enc={"vision": ["model.vision_tower"], "audio": ["model.audio_tower"]},
                   conn=["model.embed_audio", "model.embed_vision"]),
    "mllama": _vlm(enc={"vision": ["model.vision_model"]}),
    "video_llava": _vlm(enc={"video": ["model.video_tower"], "vision": ["model.image_tower"]}),
    # other names for the same three pieces
    "cosmos3_edge": _vlm(enc=VISUAL, conn=["model.projector"]),
    "deepseek_vl": _vlm(enc={"vision": ["model.vision_model"]}, conn=["model.aligner"]),
    "deepseek_vl_hybrid": _vlm(  # a SAM high-resolution tower (with its conv neck) and a SigLIP tower: one part
        enc={"vision": ["model.high_res_vision_model", "model.high_res_vision_neck", "model.high_res_vision_proj",
                        "model.vision_model"]},
        conn=["model.aligner", "model.high_res_vision_alpha"]),
    "lighton_ocr": _vlm(enc={"vision": ["model.vision_encoder"]}, conn=["model.vision_projection"]),
    "paddleocr_vl": _vlm(enc=VISUAL, conn=["model.projector"]),
    "video_llama_3": _vlm(enc={"vision": ["model.vision_model"]}, conn=["model.projector"]),
    "hyperclovax_vision_v2": _vlm(enc={"vision": ["model.vision_model"]},
                                  conn=["model.projector", "model.vision_model.merger"]),
    "idefics2": _vlm(lang=["model.text_model.layers"], enc={"vision": ["model.vision_model"]},
                     conn=["model.connector"]),  # modality projection + perceiver resampler
    "idefics3": _vlm(lang=["model.text_model.layers"], enc={"vision": ["model.vision_model"]},
                     conn=["model.connector"]),
    "smolvlm": _vlm(lang=["model.text_model.layers"], enc={"vision": ["model.vision_model"]}, conn=["model.connector"]),
    "granite_docling": _vlm(lang=["model.text_model.layers"], enc={"vision": ["model.vision_model"]},
                            conn=["model.vision_model.connector"]),  # deepstack mergers inside the vision model
    # the connector inside the vision stack (Qwen-VL and GLM-V style `visual.merger`)
    "qwen2_vl": _vlm(enc=VISUAL, conn=["model.visual.merger"]),
    "qwen2_5_vl": _vlm(enc=VISUAL, conn=["model.visual.merger"]),
    "qwen3_5": _vlm(enc=VISUAL, conn=["model.visual.merger"]),
    "qwen3_5_moe": _vlm(enc=VISUAL, conn=["model.visual.merger"]),
    "qwen4_exp": _vlm(enc=VISUAL, conn=["model.visual.merger"]),
    "exaone4_5": _vlm(enc=VISUAL, conn=["model.visual.merger"]),
    "qwen3_vl": _vlm(enc=VISUAL, conn=["model.visual.deepstack_merger_list", "model.visual.merger"]),
    "qwen3_vl_moe": _vlm(enc=VISUAL, conn=["model.visual.deepstack_merger_list", "model.visual.merger"]),
    "cohere_compass": _vlm(enc=VISUAL, conn=["model.visual.deepstack_merger_list", "model.visual.merger"]),
    "cosmos3_omni": _vlm(enc=VISUAL, conn=["model.visual.deepstack_merger_list", "model.visual.merger"]),
    "glm4v": _vlm(enc=VISUAL, conn=["model.visual.merger"]),  # its conv `downsample` stays vision
    "glm4v_moe": _vlm(enc=VISUAL, conn=["model.visual.merger"]),
    "glm46v": _vlm(enc=VISUAL, conn=["model.visual.merger"]),
    "glmga": _vlm(enc=VISUAL, conn=["model.visual.merger"]),
    "glm5_next": _vlm(enc=VISUAL, conn=["model.visual.merger"]),
    "glm_ocr": _vlm(enc=VISUAL, conn=["model.visual.merger"]),
    "qwen2_5_omni_thinker": _vlm(enc={"audio": ["model.audio_tower"], "vision": ["model.visual"]},
                                 conn=["model.audio_tower.proj", "model.visual.merger"]),
    "qwen3_omni_moe_thinker": _vlm(enc={"audio": ["model.audio_tower"], "vision": ["model.visual"]},
                                   conn=["model.audio_tower.proj2", "model.visual.merger", "model.visual.merger_list"]),
    # no `model.` wrapper
    "blip-2": _vlm(lang=["language_model.model.decoder.layers"], enc={"vision": ["vision_model"]},
                   conn=["language_projection", "qformer", "query_tokens"]),
    "instructblip": _vlm(lang=["language_model.model.decoder.layers"], enc={"vision": ["vision_model"]},
                         conn=["language_projection", "qformer", "query_tokens"]),
    "instructblipvideo": _vlm(lang=["language_model.model.decoder.layers"], enc={"vision": ["vision_model"]},
                              conn=["language_projection", "qformer", "query_tokens"]),
    "kosmos-2": _vlm(lang=["text_model.model.layers"], enc={"vision": ["vision_model"]},
                     conn=["image_to_text_projection"]),
    "kosmos-2.5": _vlm(lang=["text_model.model.layers"], enc={"vision": ["vision_model"]},
                       conn=["image_to_text_projection"]),
    "llama4": _vlm(lang=["language_model.model.layers"], enc={"vision": ["vision_model"]},
                   conn=["multi_modal_projector"]),  # the pixel-shuffle vision_adapter stays vision
    "nemotron_h_omni": _vlm(lang=["language_model.model.layers"], enc={"vision": ["vision_model"]},
                            conn=["multi_modal_projector"]),
    # encoder-decoders: a vision encoder feeding a text decoder, or a text encoder-decoder
    "blip": _vlm(lang=["text_decoder.bert.encoder.layer"], enc={"vision": ["vision_model"]}, conn=[]),
    "vision-encoder-decoder": _vlm(lang=["decoder.bert.encoder.layer"], enc={"vision": ["encoder"]}, conn=[]),
    "pix2struct": _vlm(lang=["decoder.layer"], enc={"vision": ["encoder"]}, conn=[]),
    "pp_formulanet": _vlm(lang=["model.decoder.layers"], enc={"vision": ["model.encoder"]},
                          conn=["model.encoder.multi_modal_projector"]),
    "florence2": _vlm(lang=["model.language_model.encoder.layers", "model.language_model.decoder.layers"]),
    "t5gemma2": _vlm(lang=["model.encoder.text_model.layers", "model.decoder.layers"],
                     enc={"vision": ["model.encoder.vision_tower"]}, conn=["model.encoder.multi_modal_projector"]),
    "udop": _vlm(lang=["encoder.block", "decoder.block"], enc={}, conn=["patch_embed"]),  # encoder-free
    "diffusion_gemma": _vlm(lang=["model.encoder.language_model.layers"],
                            enc={"vision": ["model.encoder.vision_tower"]}, conn=["model.encoder.embed_vision"]),
    # the language model's module holds the encoder
    "git": _vlm(lang=["git.encoder.layer"], enc={"vision": ["git.image_encoder"]}, conn=["git.visual_projection"]),
    "idefics": _vlm(lang=["model.layers"], enc={"vision": ["model.vision_model"]},
                    conn=["model.gated_cross_attn_layers"]),  # Flamingo's gated cross-attention: the bridge
    "pi0": _vlm(lang=["model.vlm.language_model.layers"], enc={"vision": ["model.vlm.vision_tower"]},
                conn=["model.vlm.multi_modal_projector"], other=["model.dit"]),  # the action expert: no rule
    # VQ image tokenizers (early fusion, or generation) and audio codecs
    "chameleon": _vlm(lang=["model.layers"], enc={"image_tokenizer": ["model.vqmodel"]}, conn=[]),
    "emu3": _vlm(lang=["model.text_model.layers"], enc={"image_tokenizer": ["model.vqmodel"]}, conn=[]),
    "janus": _vlm(enc={"vision": ["model.vision_model"], "image_tokenizer": ["model.vqmodel"]},
                  conn=["model.aligner", "model.generation_aligner", "model.generation_embeddings",
                        "model.generation_head"]),
    "apertus1p5": _vlm(enc={"image_tokenizer": ["model.vision_tokenizer"], "audio": ["model.audio_tokenizer"]},
                       conn=[]),
    # no encoder: patches go straight into the language model (the projection is the connector)
    "fuyu": _vlm(enc={}, conn=["model.vision_embed_tokens"]),
    "gemma4_unified": _vlm(enc={}, conn=["model.embed_audio", "model.embed_vision"]),
    # in the mapping but not a vision model: a causal LM, and a protein-text model
    "mistral4": _vlm(lang=["model.layers"], enc={}, conn=[]),
    "evolla": _vlm(lang=["model.layers"], enc={}, conn=[], other=["model.protein_encoder"]),
}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# --- the zoo covers the mapping ------------------------------------------------------------------------------------


def test_every_vlm_type_is_checked_or_listed_with_a_reason():
    assert len(VLM_TYPES) > 50
    assert set(NOT_BUILT) <= set(VLM_TYPES), f"stale NOT_BUILT entries: {set(NOT_BUILT) - set(VLM_TYPES)}"
    missing = sorted(set(VLM_TYPES) - set(EXPECTED) - set(NOT_BUILT))
    assert not missing, f"new VLM types in transformers: add them to EXPECTED (or NOT_BUILT with a reason): {missing}"
    gone = set(EXPECTED) - set(VLM_TYPES)
    assert not gone, f"EXPECTED names types transformers no longer has: {gone}"


@pytest.mark.parametrize("model_type", sorted(NOT_BUILT))
def test_types_not_built_fail_for_the_stated_reason(model_type):
    if HAS_TIMM:
        pytest.skip("timm is installed here: the type is built and checked with the others")
    with pytest.raises(ImportError, match="timm"):
        build(model_type)


# --- every type: a partition that matches EXPECTED ------------------------------------------------------------------


@pytest.mark.parametrize("model_type", BUILT)
def test_every_parameter_in_exactly_one_part(model_type):
    model, parts = zoo(model_type)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(parts.unit_of) == sorted(names) and len(set(names)) == len(names)
    assert parts.total_params == sum(p.numel() for p in model.parameters())
    sizes = parts.part_sizes()
    assert sum(sizes.values()) == parts.total_params
    for name, p in model.named_parameters():
        assert parts.numel[name] == p.numel()
    units = set(parts.unit_of.values())
    assert {part_of_unit(u) for u in units} <= set(sizes)
    assert parts.num_layers >= 2


@pytest.mark.parametrize("model_type", BUILT)
def test_classification_matches_the_module_tree(model_type):
    model, parts = zoo(model_type)
    want = EXPECTED[model_type]
    lang_blocks = [f"{b}.{i}" for b in want["lang"] for i in range(len(model.get_submodule(b)))]
    assert parts.language_blocks == lang_blocks
    assert parts.encoder_roots == want["enc"]
    assert parts.is_vlm == bool(want["enc"] or want["conn"])
    wrong = {}
    for name, unit in parts.unit_of.items():
        part = part_of_unit(unit)
        if any(_under(name, c) for c in want["conn"]):
            expect = {"connector"}
        elif any(_under(name, o) for o in want["other"]):
            expect = {"other"}
        elif any(_under(name, r) for roots in want["enc"].values() for r in roots):
            expect = {p for p, roots in want["enc"].items() if any(_under(name, r) for r in roots)}
        elif any(name.startswith(f"{b}.") for b in want["lang"]):
            expect = {"language"}
        else:
            expect = {"embeddings", "language", "head"}  # the rest of the language model, the output layer
        if part not in expect:
            wrong[name] = (unit, sorted(expect))
    assert not wrong, dict(list(wrong.items())[:10])
    for name in parts.unit_of:  # blocks are numbered in the order EXPECTED lists the block lists
        for i, block in enumerate(lang_blocks):
            if _under(name, block):
                assert parts.unit_of[name] == f"language.block.{i}", name
    for part, blocks in parts.encoder_blocks.items():  # (a block-less encoder, such as an audio codec, has none)
        assert all(any(_under(b, r) for r in want["enc"][part]) for b in blocks)


# --- the peers -----------------------------------------------------------------------------------------------------

LM = "language_model"
ALIGNER = "aligner"
TOWER = "vision_tower"
GENERATOR = "generator"
CATEGORY = {**{p: TOWER for p in ENCODER_PARTS}, "connector": ALIGNER, "embeddings": LM, "language": LM, "head": LM}


def _lf(vision=("vision_tower",), projector="multi_modal_projector", language=("language_model", "lm_head")):
    """LLaMA-Factory's `_register_composite_model` defaults: vision_model_keys, projector_key, language_model_keys."""
    return {TOWER: list(vision), ALIGNER: [projector], LM: list(language)}


_QWEN_LF = _lf(vision=("visual.patch_embed", "visual.blocks"), projector="visual.merger")
LLAMA_FACTORY = {
    "llava": _lf(), "llava_next": _lf(), "llava_next_video": _lf(), "paligemma": _lf(), "gemma3": _lf(),
    "internvl": _lf(),
    "llama4": _lf(vision=("vision_model",)),
    "mllama": _lf(vision=("vision_model",)),
    "mistral3": _lf(projector="model.multi_modal_projector"),
    "qwen2_vl": _QWEN_LF, "qwen2_5_vl": _QWEN_LF,
    "glm4v": _QWEN_LF, "glm4v_moe": _QWEN_LF,
    # LLaMA-Factory lists the audio tower among the vision keys; its language key `model` named the thinker's
    # text model before transformers moved it to `model.language_model`
    "qwen2_5_omni_thinker": _lf(vision=("visual.patch_embed", "visual.blocks", "audio_tower"),
                                projector="visual.merger"),
}


def _swift(vision="model.vision_tower", aligner=("model.multi_modal_projector",), language="model.language_model",
           generator=()):
    """ms-swift MultiModelKeys: language_model, aligner, vision_tower (, generator), as of its transformers>=4.52
    entries (`model.language_model` ...), which are transformers 5's names."""
    out = {TOWER: [vision] if isinstance(vision, str) else list(vision), ALIGNER: list(aligner), LM: [language]}
    if generator:
        out[GENERATOR] = list(generator)
    return out


MS_SWIFT = {
    "llava": _swift(), "llava_next": _swift(), "llava_next_video": _swift(), "llava_onevision": _swift(),
    "paligemma": _swift(), "gemma3": _swift(), "internvl": _swift(), "mistral3": _swift(),
    "mllama": _swift(vision="model.vision_model"),
    "llama4": _swift(vision="vision_model", aligner=("multi_modal_projector",), language="language_model"),
    "idefics3": _swift(vision="model.vision_model", aligner=("model.connector",), language="model.text_model"),
    "qwen2_vl": _swift(vision="model.visual", aligner=("model.visual.merger",)),
    "qwen2_5_vl": _swift(vision="model.visual", aligner=("model.visual.merger",)),
    "qwen3_vl": _swift(vision="model.visual", aligner=("model.visual.merger", "model.visual.deepstack_merger_list")),
    "qwen3_vl_moe": _swift(vision="model.visual",
                           aligner=("model.visual.merger", "model.visual.deepstack_merger_list")),
    "glm4v": _swift(vision="model.visual", aligner=("model.visual.merger",)),
    # ms-swift's qwen2_5_omni keys (`thinker.audio_tower`, `thinker.audio_tower.proj`, ...) on the thinker alone
    "qwen2_5_omni_thinker": _swift(vision=("model.audio_tower", "model.visual"),
                                   aligner=("model.audio_tower.proj", "model.visual.merger")),
    "deepseek_vl": _swift(vision="model.vision_model", aligner=("model.aligner",)),
    # deepseek_janus: gen_vision_model, gen_aligner, gen_head, gen_embed are transformers' vqmodel, generation_*
    "janus": _swift(vision="model.vision_model", aligner=("model.aligner",),
                    generator=("model.vqmodel", "model.generation_aligner", "model.generation_head",
                               "model.generation_embeddings")),
}
PEERS = {"LLaMA-Factory": LLAMA_FACTORY, "ms-swift": MS_SWIFT}

# where a peer puts a module in another category than we do: (type, peer, module) -> (our category, why)
PEER_DIFFERENCES = {
    ("qwen2_5_omni_thinker", "LLaMA-Factory", "model.audio_tower.proj"): (
        ALIGNER, "LLaMA-Factory freezes the whole audio tower with the vision keys; its last layer `proj` maps audio "
                 "features to the language width after the audio blocks, like `visual.merger`, and ms-swift lists "
                 "it as aligner: we follow ms-swift"),
    ("janus", "ms-swift", "model.vqmodel"): (
        TOWER, "ms-swift has a fourth category, generator; we name the VQ tokenizer `image_tokenizer`, an encoder "
               "part that every strategy except `full` keeps frozen"),
    ("janus", "ms-swift", "model.generation_aligner"): (
        ALIGNER, "the generation aligner, head and embeddings are MLPs and a table beside the projector: no structural "
                 "sign tells them from a projector, so they train with the connector"),
    ("janus", "ms-swift", "model.generation_head"): (ALIGNER, "see model.generation_aligner"),
    ("janus", "ms-swift", "model.generation_embeddings"): (ALIGNER, "see model.generation_aligner"),
}
# parameters a peer's keys do not name at all (so its freezing flags leave them alone): (type, peer) ->
# {module: why}; ms-swift's language_model key never covers `lm_head` (it trains with the language model)
_SWIFT_HEAD = {"lm_head": "ms-swift's language_model key is the decoder; lm_head trains with it (our `head`)"}
_NEWLINE = {"model.image_newline": "a bare parameter in no peer key; SPEC counts bare parameters as connector"}
PEER_GAPS = {
    **{(t, "ms-swift"): dict(_SWIFT_HEAD) for t in MS_SWIFT if t != "llama4"},  # llama4: inside `language_model`
    ("llava_next", "LLaMA-Factory"): _NEWLINE, ("llava_next_video", "LLaMA-Factory"): _NEWLINE,
    ("llava_next", "ms-swift"): {**_SWIFT_HEAD, **_NEWLINE},
    ("llava_next_video", "ms-swift"): {**_SWIFT_HEAD, **_NEWLINE},
    ("llava_onevision", "ms-swift"): {**_SWIFT_HEAD, **_NEWLINE},
    **{(t, "LLaMA-Factory"): {
        m: "LLaMA-Factory's GLM-4V vision keys name only patch_embed and blocks; ms-swift's vision tower (all of "
           "model.visual but the merger) covers it, and so do we (vision)"
        for m in ("model.visual.embeddings", "model.visual.post_conv_layernorm", "model.visual.post_layernorm",
                  "model.visual.downsample")} for t in ("glm4v", "glm4v_moe")},
}


def _key_matches(key: str, name: str) -> bool:
    """A peer key names a parameter when it is a run of whole path components in it (LLaMA-Factory matches keys
    as substrings of parameter names, ms-swift as prefixes; both are this for their keys)."""
    return f".{key}." in f".{name}."


def peer_category(entry: dict, name: str) -> tuple[str, str] | None:
    """(category, key) of the longest key naming ``name`` (ms-swift's aligner inside its vision tower wins)."""
    hits = [(len(k), cat, k) for cat, keys in entry.items() for k in keys if _key_matches(k, name)]
    return max(hits)[1:] if hits else None


PEER_CASES = [(t, peer) for peer, table in PEERS.items() for t in sorted(table)]


@pytest.mark.parametrize("model_type,peer", PEER_CASES, ids=[f"{t}-{p}" for t, p in PEER_CASES])
def test_classification_agrees_with_peer_registries(model_type, peer):
    model, parts = zoo(model_type)
    entry = PEERS[peer][model_type]
    for keys in entry.values():  # every key names something in transformers 5's module tree
        for key in keys:  # (a tied lm_head is listed under the input embeddings only)
            assert any(_key_matches(key, n) for n in parts.unit_of) or (key == "lm_head" and parts.tied_head), (
                f"{peer} key {key!r} names nothing in {model_type}")
    gaps = {g: why for g, why in PEER_GAPS.get((model_type, peer), {}).items()
            if not (g == "lm_head" and parts.tied_head)}
    uncovered, disagree, used_gaps, used_diffs = [], {}, set(), set()
    for name, unit in parts.unit_of.items():
        ours = CATEGORY.get(part_of_unit(unit))
        theirs = peer_category(entry, name)
        if theirs is None:
            gap = next((g for g in gaps if _under(name, g)), None)
            if gap is None:
                uncovered.append(name)
            else:
                used_gaps.add(gap)
            continue
        diff = next((k for k in PEER_DIFFERENCES if k[:2] == (model_type, peer) and _under(name, k[2])), None)
        if diff is not None:
            used_diffs.add(diff)
            assert ours == PEER_DIFFERENCES[diff][0], (name, unit, PEER_DIFFERENCES[diff])
        elif ours != theirs[0]:
            disagree[name] = (unit, theirs)
    assert not disagree, f"{model_type} vs {peer}: {dict(list(disagree.items())[:8])}"
    assert not uncovered, f"{model_type}: parameters {peer}'s keys do not name: {uncovered[:8]} (add a PEER_GAPS note)"
    assert used_gaps == set(gaps), f"stale PEER_GAPS entries: {set(gaps) - used_gaps}"
    stale = {k for k in PEER_DIFFERENCES if k[:2] == (model_type, peer)} - used_diffs
    assert not stale, f"stale PEER_DIFFERENCES entries: {stale}"


def test_peer_tables_cover_the_families_the_issue_names():
    named = {"llava", "llava_next", "paligemma", "gemma3", "internvl", "mistral3", "qwen2_vl", "qwen2_5_vl",
             "qwen3_vl", "glm4v", "idefics3", "mllama", "llama4"}
    assert named <= set(LLAMA_FACTORY) | set(MS_SWIFT)
    assert set(LLAMA_FACTORY) | set(MS_SWIFT) <= set(BUILT)


# --- notes: detection says where it was unsure ------------------------------------------------------------------


@pytest.mark.parametrize("model_type,words", [
    ("mllama", "mixes block types"),  # self- and cross-attention decoder layers in one list
    ("mllama", "2 block lists"),  # local and global vision transformers
    ("lfm2_vl", "linear patch embedding"),  # Siglip2: no convolution
    ("llama4", "linear patch embedding"),
    ("florence2", "encoder-decoder language model"),
    ("fuyu", "encoder-free"),
    ("pi0", "counted as `other`"),
    ("evolla", "counted as `other`"),
    ("deepseek_vl_hybrid", "form one `vision` part"),
])
def test_unsure_detection_is_noted(model_type, words):
    _, parts = zoo(model_type)
    assert any(words in n for n in parts.notes), parts.notes


def test_plain_llava_needs_no_note():
    for model_type in ("llava", "qwen2_vl", "idefics3", "paligemma", "internvl"):
        assert zoo(model_type)[1].notes == [], model_type


# --- several encoders: each strategy says what it does with each ---------------------------------------------------


def _plan(model_type: str, strategy: dict):
    with torch.device("meta"):
        return build_plan(build(model_type), strategy)


def _trained_parts(plan) -> dict[str, int]:
    return {p: v["trainable"] for p, v in plan.summary()["parts"].items() if v["params"]}


def test_every_strategy_says_what_it_does_with_every_extra_encoder():
    from strategies.registry import EXTRA_ENCODERS, STRATEGIES

    assert EXTRA_ENCODERS == tuple(p for p in ENCODER_PARTS if p != "vision")
    for strategy in STRATEGIES.values():
        assert {part for part, _ in strategy.encoders} == set(EXTRA_ENCODERS), strategy.name
        assert {action for _, action in strategy.encoders} <= {"frozen", "train", "ask"}
    assert dict(STRATEGIES["full"].encoders) == dict.fromkeys(EXTRA_ENCODERS, "train")


@pytest.mark.parametrize("name", ["top_k", "progressive", "feature_extraction", "connector_only",
                                  "connector_llm_lora", "vision_frozen_llm_full"])
def test_strategies_that_freeze_other_encoders(name):
    plan = _plan("qwen2_5_omni_thinker", {"name": name})
    trained = _trained_parts(plan)
    assert trained["audio"] == 0 and trained["vision"] == 0
    # (under LoRA the paths carry peft's `base_model.model.` prefix)
    assert any("audio encoder (" in n and "model.audio_tower) stays frozen" in n for n in plan.summary()["notes"])


def test_full_trains_every_encoder():
    plan = _plan("video_llava", {"name": "full"})
    s = plan.summary()
    assert all(v["trainable"] == v["params"] for v in s["parts"].values())
    assert s["parts"]["video"]["params"] > 0 and s["encoders"] == {"video": ["model.video_tower"],
                                                                     "vision": ["model.image_tower"]}


def test_every_encoder_takes_the_encoder_lr_with_discriminative_decay():
    """vision_lr is the encoders' LR: a video (or audio) encoder's blocks get it too, decayed per block."""
    plan = _plan("video_llava", {"name": "full", "lr": 1e-4, "vision_lr": 1e-6, "layer_decay": 0.5})
    video = len(plan.parts.encoder_blocks["video"])
    assert plan.unit_lr(f"video.block.{video - 1}") == pytest.approx(1e-6)  # the top block: vision_lr itself
    assert plan.unit_lr("video.block.0") == pytest.approx(1e-6 * 0.5 ** (video - 1))
    assert plan.unit_lr("video.embeddings") == pytest.approx(1e-6 * 0.5 ** video)
    assert plan.unit_lr("vision.block.0") == plan.unit_lr("video.block.0")  # same depth, same rule


@pytest.mark.parametrize("model_type,part", [("qwen2_5_omni_thinker", "audio"), ("video_llava", "video")])
def test_all_lora_asks_for_strategy_parts(model_type, part):
    with pytest.raises(StrategyConfigError) as err:
        _plan(model_type, {"name": "all_lora"})
    msg = str(err.value)
    assert f"`{part}`" in msg and "strategy.parts" in msg and "parts: {vision:" in msg
    assert "full trains it" in msg and "connector_only freezes it" in msg


def test_naming_the_vision_encoder_decides_for_all_lora():
    plan = _plan("qwen2_5_omni_thinker", {"name": "all_lora", "parts": {"vision": "model.visual"}})
    trained = _trained_parts(plan)
    assert trained["audio"] == 0
    lora = [n for n in plan.adapter_names if ".lora_" in n]
    assert any(".visual.blocks." in n for n in lora) and not any("audio_tower" in n for n in lora)
    assert any("audio encoder (" in n and "model.audio_tower) stays frozen under all_lora" in n
               for n in plan.summary()["notes"])


def test_moving_an_encoder_into_the_connector_trains_it_fully():
    plan = _plan("qwen2_5_omni_thinker", {"name": "all_lora", "parts": {"connector": ["model.audio_tower"]}})
    assert "audio" not in plan.parts.encoder_roots
    audio = [n for n in plan.parts.unit_of if ".audio_tower." in n and ".lora_" not in n]
    assert audio and all(plan.parts.unit_of[n] == "connector" for n in audio)
    assert set(audio) <= set(plan.trainable_names())


def test_a_vision_override_names_one_of_two_image_encoders():
    """DeepSeek-VL hybrid has a high-resolution SAM tower and a SigLIP tower (one `vision` part); naming one in
    `parts.vision` makes the other `other` (frozen except by `full`), and the plan says so."""
    model = build("deepseek_vl_hybrid")
    parts = find_parts(model, {"vision": "model.vision_model"})
    assert parts.encoder_roots == {"vision": ["model.vision_model"]}
    assert all(u == "other" for n, u in parts.unit_of.items() if n.startswith("model.high_res_vision_model."))
    assert any("`model.high_res_vision_model` looks like an image encoder" in n for n in parts.notes)


def test_vq_image_tokenizer_is_frozen_except_by_full():
    for name in ("all_lora", "vision_frozen_llm_full", "connector_only"):
        assert _trained_parts(_plan("janus", {"name": name}))["image_tokenizer"] == 0, name
    full = _trained_parts(_plan("janus", {"name": "full"}))
    assert full["image_tokenizer"] > 0


def test_all_lora_on_an_encoder_free_vlm_says_why():
    with pytest.raises(StrategyConfigError, match="no|none"):
        _plan("fuyu", {"name": "all_lora"})
    assert _trained_parts(_plan("fuyu", {"name": "connector_only"}))["connector"] > 0


# --- the plan states every parameter's part --------------------------------------------------------------------------


def test_plan_summary_maps_every_parameter_to_its_part_and_prints_warnings():
    from pipelines.reporting.plan_view import render_plan

    plan = _plan("mllama", {"name": "top_k", "top_k": 2})
    s = plan.summary()
    names = [n for n, _ in plan.model.named_parameters()]
    assert sorted(s["param_parts"]) == sorted(names) == sorted(s["param_units"])
    assert all(s["param_parts"][n] == part_of_unit(s["param_units"][n]) for n in names)
    assert s["param_units"]["model.language_model.layers.3.cross_attn.q_proj.weight"] == "language.block.3"
    assert s["param_parts"]["model.vision_model.global_transformer.layers.0.mlp.fc1.weight"] == "vision"
    assert any("mixes block types" in w for w in s["warnings"])
    json.dumps(s)
    text = render_plan(s)
    assert "warning (part detection):" in text and "mixes block types" in text


def test_freezetune_plan_json_has_param_parts(capsys):
    from pipelines.cli.main import run

    assert run(["plan", "--model", "tiny-qwen2-vl", "--strategy", "connector_only", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["param_parts"]["model.visual.merger.mlp.0.weight"] == "connector"
    assert s["param_parts"]["model.visual.blocks.0.attn.qkv.weight"] == "vision"
    assert s["param_parts"]["lm_head.weight"] == "head"
    assert set(s["param_parts"].values()) <= {"vision", "connector", "embeddings", "language", "head"}


def test_freezetune_strategies_lists_what_needs_strategy_parts(tmp_path, capsys):
    from pipelines.cli.main import run

    cfg = tiny_config("qwen2_5_omni_thinker")
    cfg.architectures = [modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES["qwen2_5_omni_thinker"]]
    cfg.save_pretrained(tmp_path)
    assert run(["strategies", "--model", str(tmp_path), "--json"]) == 0
    summaries = json.loads(capsys.readouterr().out)
    assert "all_lora" not in {s["strategy"] for s in summaries}
    assert all("audio encoder" in s["undecided"]["all_lora"] or "`audio`" in s["undecided"]["all_lora"]
               for s in summaries)
    full = next(s for s in summaries if s["strategy"] == "full")
    assert full["parts"]["audio"]["trainable"] == full["parts"]["audio"]["params"] > 0
    assert run(["strategies", "--model", str(tmp_path)]) == 0
    assert "all_lora: needs `strategy.parts` on this model" in capsys.readouterr().out


# --- Llama 3.2 Vision (mllama) on a real tiny model ----------------------------------------------------------------


def tiny_mllama() -> nn.Module:
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                  image_size=28, patch_size=14, max_num_tiles=2, intermediate_layers_indices=[0, 1],
                  vision_output_dim=96, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    text = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, cross_attention_layers=[1, 3], max_position_embeddings=256,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return tf.MllamaForConditionalGeneration(tf.MllamaConfig(vision_config=vision, text_config=text,
                                                             image_token_index=383))


def _names_under(model: nn.Module, *prefixes: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if any(_under(n, p) for p in prefixes)}


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


MLLAMA_VISION = "model.vision_model"
MLLAMA_LANG = "model.language_model"


def test_mllama_parts():
    model = tiny_mllama()
    parts = find_parts(model)
    assert parts.language_blocks == [f"{MLLAMA_LANG}.layers.{i}" for i in range(4)]
    kinds = [type(model.get_submodule(b)).__name__ for b in parts.language_blocks]
    assert kinds == ["MllamaSelfAttentionDecoderLayer", "MllamaCrossAttentionDecoderLayer"] * 2
    assert parts.vision_root == MLLAMA_VISION
    assert parts.vision_blocks == [f"{MLLAMA_VISION}.transformer.layers.{i}" for i in range(2)] + [
        f"{MLLAMA_VISION}.global_transformer.layers.0"]
    vision = _names_under(model, MLLAMA_VISION)
    assert {n for n, u in parts.unit_of.items() if u.startswith("vision")} == vision
    connector = {n for n, u in parts.unit_of.items() if u == "connector"}
    assert connector == _names_under(model, "model.multi_modal_projector")
    assert parts.unit_of["lm_head.weight"] == "head"


def test_mllama_top_k_trains_only_language_blocks():
    model = tiny_mllama()
    build_plan(model, {"name": "top_k", "top_k": 2})
    expected = _names_under(model, f"{MLLAMA_LANG}.layers.2", f"{MLLAMA_LANG}.layers.3", f"{MLLAMA_LANG}.norm",
                            "lm_head", "model.multi_modal_projector")
    assert _trainable(model) == expected
    # a step with an image: backward reaches no vision parameter and no lower language block
    ids = torch.tensor([[383, 5, 6, 7, 8]])
    out = model(input_ids=ids, pixel_values=torch.randn(1, 1, 2, 3, 28, 28), aspect_ratio_ids=torch.tensor([[2]]),
                aspect_ratio_mask=torch.tensor([[[1, 1]]]),
                cross_attention_mask=torch.ones(1, 5, 1, 2, dtype=torch.long), labels=ids)
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and with_grad <= expected
    assert any(n.startswith(f"{MLLAMA_LANG}.layers.3.cross_attn.") for n in with_grad)  # a cross-attention block
    assert not with_grad & _names_under(model, MLLAMA_VISION)


def test_mllama_vlm_strategies_do_what_their_names_say():
    vision_blocks = (f"{MLLAMA_VISION}.transformer.layers", f"{MLLAMA_VISION}.global_transformer.layers")
    model = tiny_mllama()
    all_names = {n for n, _ in model.named_parameters()}
    vision = _names_under(model, MLLAMA_VISION)
    connector = _names_under(model, "model.multi_modal_projector")
    language = _names_under(model, f"{MLLAMA_LANG}.layers", f"{MLLAMA_LANG}.norm", "lm_head")

    build_plan(model, {"name": "connector_only"})  # A
    assert _trainable(model) == connector

    plan = build_plan(tiny_mllama(), {"name": "connector_llm_lora"})  # B
    lora = {n for n in _trainable(plan.model) if ".lora_" in n}
    assert lora and all(".language_model.layers." in n for n in lora)
    for i in range(4):  # self- and cross-attention layers alike
        assert any(f".language_model.layers.{i}." in n for n in lora), i
    assert _trainable(plan.model) - lora == {f"base_model.model.{n}" for n in connector}

    plan = build_plan(tiny_mllama(), {"name": "all_lora"})  # C
    lora = {n for n in _trainable(plan.model) if ".lora_" in n}
    assert any(".language_model.layers.1.cross_attn." in n for n in lora)
    for blocks in vision_blocks:  # local and global vision transformers both get adapters
        assert any(f".{blocks}." in n for n in lora), blocks
    assert _trainable(plan.model) - lora == {f"base_model.model.{n}" for n in connector}

    model = tiny_mllama()
    build_plan(model, {"name": "vision_frozen_llm_full"})  # D
    assert _trainable(model) == connector | language
    assert not _trainable(model) & vision

    model = tiny_mllama()
    build_plan(model, {"name": "full"})  # E
    assert _trainable(model) == all_names
