"""Tiny random LLaVA-1.5 and Qwen2.5-VL checkpoints, saved as ordinary folders (no hub, CPU).

The shapes follow ``shared/notes/tiny-vlms.md`` (verified recipe): real transformers config and
model classes, a local word-level tokenizer whose vocabulary covers the five prompts, the real
checkpoints' chat templates, ``initializer_range=0.2`` so that silent bugs move the numbers by
more than float noise. The folders go through the judges' real loading path
(``from_pretrained`` on a folder). Build once per test session (``tiny_checkpoint``).
``build_model(family, "7b", device="cuda", dtype=torch.bfloat16)`` gives the real checkpoints'
shapes with random weights, in memory, for ``benchmarks/gpu/micro.py``.

Imports torch and transformers: tests and benchmarks only.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

REPO = Path(__file__).resolve().parents[1]
# The real checkpoints' chat templates, verbatim (llava-hf/llava-1.5-7b-hf, Qwen/Qwen2.5-VL-7B-Instruct;
# copies in shared/notes/chat-templates/).
LLAVA_TEMPLATE = "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
QWEN_TEMPLATE = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
PROMPTS = REPO / "workers" / "prompts"

LLAVA_SPECIALS = ["<s>", "</s>", "<pad>", "<image>"]
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Words of the chat templates and answers beyond the prompt files.
EXTRA_WORDS = (
    "USER ASSISTANT system user assistant You are a helpful Yes No yes no Answer Reasoning score "
    "preference match road roads building buildings same different layout because the image satellite "
    "0 1 2 3 4 5 6 7 8 9 { } \" : , . ' ( ) [ ] - / ? !"
).split()


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )


def prompt_words() -> list[str]:
    """Every piece the pre-tokenizer makes of the five prompts (placeholders removed)."""
    pre = _pre_tokenizer()
    words: list[str] = []
    for path in sorted(PROMPTS.glob("*.txt")):
        text = re.sub(r"'?<(GROUNDIMAGE|AERIALIMAGE[12]?)>'?", " ", path.read_text("utf-8"))
        words.extend(piece for piece, _ in pre.pre_tokenize_str(text))
    return words


def build_tokenizer(specials: list[str], *, bos: str | None, eos: str, pad: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the prompt words; spaces are not modelled (see the notes)."""
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", *specials, *EXTRA_WORDS, *prompt_words()]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(specials)  # else "<image>" splits into "<", "image", ">"
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, vocab[bos])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_input_names=["input_ids", "attention_mask"],
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token="<unk>",
        padding_side="left",
    )


# CLIP's normalisation (llava-1.5 and Qwen2.5-VL preprocessors both use it).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def llava_parts(shapes: str = "tiny") -> tuple[LlavaConfig, LlavaProcessor]:
    """Config and processor of LLaVA-1.5: ``tiny`` (CLIP 32 px, patch 8, 16 tokens per image,
    Llama 2x64) or ``7b`` (llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px, 576 tokens, Llama-7B)."""
    tok = build_tokenizer(LLAVA_SPECIALS, bos="<s>", eos="</s>", pad="<pad>")
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if shapes == "tiny":
        side, patch = 32, 8
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=side,
            patch_size=patch,
            initializer_range=0.2,
        )
        text = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            initializer_range=0.2,
            **ids,
        )
    elif shapes == "7b":
        side, patch = 336, 14
        vision = CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=side,
            patch_size=patch,
            projection_dim=768,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        )
        # The real vocabulary is 32064 rows; only the tiny tokenizer's ids are ever looked up.
        text = LlamaConfig(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            **ids,
        )
    else:
        raise ValueError(f"shapes must be tiny or 7b, not {shapes!r}")
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            do_center_crop=True,
            resample=3,  # bicubic, as llava-1.5's preprocessor
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        ),
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=LLAVA_TEMPLATE,
    )
    return cfg, proc


def qwen_parts(shapes: str = "tiny") -> tuple[Qwen2_5_VLConfig, Qwen2_5_VLProcessor]:
    """Config and processor of Qwen2.5-VL: ``tiny`` (windowed vision tower of 2 blocks, M-RoPE
    text model 2x64, 4-16 tokens per image) or ``7b`` (Qwen2.5-VL-7B-Instruct's shapes and pixel budget)."""
    tok = build_tokenizer(QWEN_SPECIALS, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    tid = tok.convert_tokens_to_ids
    ids = dict(
        bos_token_id=tid("<|endoftext|>"),  # as in the real checkpoint (no BOS is prepended)
        eos_token_id=tid("<|im_end|>"),
        pad_token_id=tid("<|endoftext|>"),
    )
    if shapes == "tiny":
        text = dict(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            initializer_range=0.2,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            **ids,
        )
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
            out_hidden_size=64,
            initializer_range=0.2,
        )
        pixels = dict(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    elif shapes == "7b":
        text = dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            rms_norm_eps=1e-6,
            max_position_embeddings=128000,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            **ids,
        )
        vision = dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            out_hidden_size=3584,
            hidden_act="silu",
            tokens_per_second=2,
        )
        pixels = dict(min_pixels=3136, max_pixels=12845056)
    else:
        raise ValueError(f"shapes must be tiny or 7b, not {shapes!r}")
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
    )
    px = dict(
        **pixels,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    proc = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**px),
        video_processor=Qwen2VLVideoProcessor(**px),
        tokenizer=tok,
        chat_template=QWEN_TEMPLATE,
    )
    return cfg, proc


MODEL_CLASSES = {"llava": LlavaForConditionalGeneration, "qwen2.5-vl": Qwen2_5_VLForConditionalGeneration}
PARTS = {"llava": llava_parts, "qwen2.5-vl": qwen_parts}


def build_model(family: str, shapes: str = "tiny", seed: int = 0, device: str = "cpu", dtype=torch.float32):
    """(model with random weights, processor), built in memory on ``device`` in ``dtype``."""
    cfg, proc = PARTS[family](shapes)
    torch.manual_seed(seed)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # a 7B model never exists in fp32
    try:
        with torch.device(device):
            model = MODEL_CLASSES[family](cfg).eval()
    finally:
        torch.set_default_dtype(before)
    return model, proc


def build_tiny_llava(folder: Path, seed: int = 0) -> Path:
    """A tiny random LLaVA-1.5 checkpoint folder."""
    return _save(folder, *build_model("llava", "tiny", seed))


def build_tiny_qwen(folder: Path, seed: int = 0) -> Path:
    """A tiny random Qwen2.5-VL checkpoint folder."""
    return _save(folder, *build_model("qwen2.5-vl", "tiny", seed))


def _save(folder: Path, model, proc) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


BUILDERS = {"llava": build_tiny_llava, "qwen2.5-vl": build_tiny_qwen}
_built: dict[tuple[str, str], Path] = {}
_lock = threading.Lock()


def tiny_checkpoint(family: str, base: Path) -> Path:
    """The tiny checkpoint folder of ``family`` under ``base``, built on first use only."""
    key = (family, str(base))
    with _lock:
        if key not in _built:
            folder = base / f"tiny-{family}"
            if not (folder / "config.json").is_file():
                BUILDERS[family](folder)
            _built[key] = folder
        return _built[key]


def model_type(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["model_type"]
