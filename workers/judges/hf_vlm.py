"""Hugging Face vision-language judges: what LLaVA-1.5 and Qwen2.5-VL share.

A judge loads one checkpoint (hub id or local folder) with ``from_pretrained``, once per worker
process, bf16 on a GPU and fp32 on the CPU. ``choice_probs`` reads next-token probabilities in one
forward pass per judgment; ``generate`` decodes greedily. The family modules (``llava.py``,
``qwen_vl.py``) say how a prompt is rendered through the chat template, how images become vision
features and where those features sit in the sequence.

Two ways to score a batch, both left to right over the same tokens:

- plain: the processor builds left-padded inputs (every output passed through, Qwen's
  ``mm_token_type_ids`` included) and the model runs with ``logits_to_keep=1``;
- reuse (the default): each image's vision features come from a bounded per-process cache (an
  image is encoded once however many comparisons show it); the requests of one query share the
  tokens up to the end of the ground panorama (chat header, instruction, panorama), whose
  key-value cache is computed once per batch and expanded to every comparison of that query; the
  rest (tiles, text, answer prefix) runs right-padded on top and the last real position is read.

The unit tests hold both paths to each other and a batch to one-at-a-time within 1e-4 (fp32).
Answer token ids always come from the loaded tokenizer (``answer_token_ids``), never constants.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoConfig, AutoProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from workers.judges.base import JudgeRequest
from workers.judges.registry import checkpoint_family_error, read_model_type
from workers.prompts import split_prompt

log = logging.getLogger(__name__)

# Worker-level settings (a property of the GPU and the process, not of a run).
DEVICE_ENV = "CVGL_VLM_DEVICE"  # "cuda", "cuda:1", "cpu"; default: cuda when available
DTYPE_ENV = "CVGL_VLM_DTYPE"  # "bfloat16", "float16", "float32"; default: bf16 on GPU, fp32 on CPU
BATCH_SIZE_ENV = "CVGL_VLM_BATCH_SIZE"  # judgments per forward pass
REUSE_ENV = "CVGL_VLM_REUSE"  # "1": feature cache + ground-prefix KV cache; "0": plain batches
FEATURE_CACHE_ENV = "CVGL_VLM_FEATURE_CACHE_MB"  # bound of the per-process vision-feature cache

DEFAULT_BATCH_SIZE = 8
DEFAULT_FEATURE_CACHE_MB = 2048.0
# Images are converted to RGB whatever their mode; the processors then resize them (LLaVA-1.5:
# shortest side 336 and a 336x336 centre crop; Qwen2.5-VL: aspect kept, sides rounded to
# multiples of 28 within its pixel budget). Outside these bounds an image is refused.
MIN_IMAGE_SIDE = 8
MAX_IMAGE_SIDE = 16384
MAX_ASPECT_RATIO = 20.0
VISION_CHUNK = 16  # images per vision-tower call when filling the cache

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class BadImage(ValueError):
    """An image that cannot be judged: missing, unreadable, or of an unusable size."""


class AnswerTokenError(ValueError):
    """The answers cannot be read as distinct next tokens after this prompt."""


# ----------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class VLMSettings:
    device: str
    dtype: str
    batch_size: int
    reuse: bool
    feature_cache_mb: float

    @classmethod
    def resolve(
        cls,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | None = None,
        reuse: bool | None = None,
        feature_cache_mb: float | None = None,
    ) -> VLMSettings:
        """Arguments win over the CVGL_VLM_* environment, which wins over the defaults."""
        device = (
            device
            or os.environ.get(DEVICE_ENV, "").strip()
            or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA GPU")
        dtype = (
            dtype or os.environ.get(DTYPE_ENV, "").strip() or ("float32" if device == "cpu" else "bfloat16")
        )
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if batch_size is None:
            batch_size = int(os.environ.get(BATCH_SIZE_ENV, "") or DEFAULT_BATCH_SIZE)
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if reuse is None:
            reuse = os.environ.get(REUSE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
        if feature_cache_mb is None:
            feature_cache_mb = float(os.environ.get(FEATURE_CACHE_ENV, "") or DEFAULT_FEATURE_CACHE_MB)
        return cls(device, dtype, int(batch_size), bool(reuse), float(feature_cache_mb))


# ----------------------------------------------------------------------------------------------
# checkpoints and revisions


def folder_revision(folder: Path) -> str:
    """A stable name for a local checkpoint: the commit of a hub-cache snapshot, else a content hash.

    The hash covers the config, weights, tokenizer, processor and chat-template files (names and
    bytes), so two copies of one checkpoint share it and any change to those files changes it.
    """
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", folder.name):
        return folder.name
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in {".json", ".safetensors", ".bin", ".jinja", ".model", ".txt"}:
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 24), b""):
                    digest.update(block)
    return "local-" + digest.hexdigest()[:12]


def hub_revision(model: str, revision: str | None) -> tuple[str | None, str]:
    """(revision to load, commit to store) for a hub id; works offline from the local cache."""
    from transformers.utils.hub import cached_file, extract_commit_hash, resolve_revision

    resolved = resolve_revision(model, revision)
    commit = getattr(resolved, "resolved", None)
    if commit is None:
        try:
            commit = extract_commit_hash(cached_file(model, "config.json", revision=resolved), None)
        except OSError:
            commit = None
    return resolved, str(commit or revision or "main")


def check_family(judge_name: str, model: str, revision: str | None) -> None:
    """Refuse a checkpoint of another family before loading any weights."""
    if Path(model).is_dir():
        model_type = read_model_type(Path(model))
    else:
        model_type = AutoConfig.from_pretrained(model, revision=revision).model_type
    problem = checkpoint_family_error(judge_name, model, model_type)
    if problem:
        raise ValueError(problem)


# ----------------------------------------------------------------------------------------------
# images


def load_image(path: Path) -> Image.Image:
    """Decode an image fully and convert it to RGB; a clear BadImage otherwise."""
    try:
        with Image.open(path) as img:
            img.load()
            rgb = _to_rgb(img)
    except FileNotFoundError as exc:
        raise BadImage(f"image not found: {path}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"image {path} is corrupt or not an image: {exc}") from exc
    w, h = rgb.size
    if min(w, h) < MIN_IMAGE_SIDE or max(w, h) > MAX_IMAGE_SIDE or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise BadImage(
            f"image {path} is {w}x{h}; judges accept sides of {MIN_IMAGE_SIDE}-{MAX_IMAGE_SIDE} px "
            f"and an aspect ratio up to {MAX_ASPECT_RATIO:g}"
        )
    return rgb


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB of any mode. PIL's own conversion clips 16-bit and float pixels to 255, so those are
    scaled first: 16-bit by 1/257, 32-bit integer and float by their own range."""
    if img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float32) / 257.0
    elif img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    else:
        return img.convert("RGB")
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")


def image_key(path: Path) -> tuple[str, int, int]:
    """Cache key of an image file: a rewritten file gets a new key."""
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise BadImage(f"image not found: {path}") from exc
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


@dataclass
class ImageFeatures:
    """One image as the language model sees it: projected vision features (and Qwen's grid)."""

    embeds: torch.Tensor  # [tokens, hidden], on the model's device and dtype
    grid_thw: torch.Tensor | None = None  # Qwen2.5-VL: (t, h, w) patches before merging, on the CPU

    @property
    def n_tokens(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def nbytes(self) -> int:
        return self.embeds.numel() * self.embeds.element_size()


class FeatureCache:
    """A least-recently-used map image key -> ImageFeatures, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[tuple, ImageFeatures] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple) -> ImageFeatures | None:
        feats = self._items.get(key)
        if feats is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return feats

    def put(self, key: tuple, feats: ImageFeatures) -> None:
        if key in self._items:
            self.bytes -= self._items.pop(key).nbytes
        if feats.nbytes > self.max_bytes:
            return
        self._items[key] = feats
        self.bytes += feats.nbytes
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.nbytes

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


# ----------------------------------------------------------------------------------------------
# answer tokens


def _opens_answer(text: str) -> bool:
    """True when an answer follows ``text`` without a space (after a newline, a quote, a bracket)."""
    return not text or text[-1].isspace() or text[-1] in "\"'([{"


def join_answer_prefix(chat_text: str, answer_prefix: str) -> str:
    """The assistant turn forced to begin with ``answer_prefix`` (one space after 'ASSISTANT:')."""
    if not answer_prefix:
        return chat_text
    return chat_text + ("" if _opens_answer(chat_text) else " ") + answer_prefix


def answer_token_ids(tokenizer: Any, text: str, choices: Sequence[str]) -> tuple[str, list[int]]:
    """The text to score and the id of each choice's first token after it, from the tokenizer.

    The answer follows ``text`` the way the model would write it: with a leading space after a
    word or colon ('ASSISTANT: Yes' is ``▁Yes`` in LLaVA's tokenizer), bare after a newline or a
    quote. If the choices then share their first token (LLaVA writes every digit as ``▁`` + digit)
    the space moves into the prompt and the bare choices are read. Raises AnswerTokenError when
    the prompt's own tokens change at the boundary or the choices cannot be told apart.
    """
    lead = "" if _opens_answer(text) else " "
    attempts = [(text, lead)] + ([(text + lead, "")] if lead else [])
    problems = []
    for prompt, sep in attempts:
        try:
            return prompt, _first_token_ids(tokenizer, prompt, [sep + c for c in choices])
        except AnswerTokenError as exc:
            problems.append(str(exc))
    raise AnswerTokenError("; ".join(problems))


def _first_token_ids(tokenizer: Any, prompt: str, answers: Sequence[str]) -> list[int]:
    base = tokenizer.encode(prompt, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = []
    for answer in answers:
        full = tokenizer.encode(prompt + answer, add_special_tokens=False)
        if full[: len(base)] != base or len(full) == len(base):
            raise AnswerTokenError(f"the prompt's last tokens merge with the answer {answer!r}")
        if full[len(base)] == unk:
            raise AnswerTokenError(f"the answer {answer!r} starts with an unknown token")
        ids.append(full[len(base)])
    if len(set(ids)) != len(ids):
        named = {a: tokenizer.convert_ids_to_tokens(i) for a, i in zip(answers, ids, strict=True)}
        raise AnswerTokenError(f"the answers share a first token: {named}")
    return ids


# ----------------------------------------------------------------------------------------------
# the judge


@dataclass
class _Row:
    """One request made ready for the model."""

    text: str  # the whole prompt text: chat turn, forced answer start, image placeholders
    images: tuple[Path, ...]
    answer_ids: list[int] = field(default_factory=list)


class HFVisionJudge:
    """A transformers vision-language judge. Family classes set the class attributes and hooks."""

    name: ClassVar[str]
    family: ClassVar[str]  # for messages: "LLaVA-1.5"
    model_class: ClassVar[str]  # transformers class name
    position_dims: ClassVar[int] = 1  # rows of position ids: 1 (LLaVA) or 3 (Qwen M-RoPE)

    def __init__(
        self,
        model: str,
        revision: str | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | None = None,
        reuse: bool | None = None,
        feature_cache_mb: float | None = None,
    ) -> None:
        settings = VLMSettings.resolve(device, dtype, batch_size, reuse, feature_cache_mb)
        check_family(self.name, model, revision)
        if Path(model).is_dir():
            load_revision, stored_revision = None, folder_revision(Path(model))
        else:
            load_revision, stored_revision = hub_revision(model, revision)
        import transformers

        model_cls = getattr(transformers, self.model_class)
        processor = AutoProcessor.from_pretrained(model, revision=load_revision)
        hf_model = model_cls.from_pretrained(model, revision=load_revision, dtype=_DTYPES[settings.dtype])
        self._setup(hf_model, processor, model, stored_revision, settings)

    @classmethod
    def from_loaded(
        cls, hf_model: Any, processor: Any, model: str, revision: str, **settings: Any
    ) -> HFVisionJudge:
        """Wrap a model built in memory (benchmarks with random 7B-shaped weights)."""
        judge = cls.__new__(cls)
        resolved = VLMSettings.resolve(**settings)
        judge._setup(hf_model.to(_DTYPES[resolved.dtype]), processor, model, revision, resolved)
        return judge

    def _setup(self, hf_model: Any, processor: Any, model: str, revision: str, settings: VLMSettings) -> None:
        self.model = model
        self.revision = revision
        self.settings = settings
        self.device = torch.device(settings.device)
        self.dtype = _DTYPES[settings.dtype]
        self.hf = hf_model.to(self.device).eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # Left padding: the last position is every row's next token (batched forward and generate).
        self.tokenizer.padding_side = "left"
        self.image_token = processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.features = FeatureCache(int(settings.feature_cache_mb * 2**20))
        self._lock = threading.Lock()
        self._chat_texts: dict[str, str] = {}
        self._answers: dict[tuple[str, tuple[str, ...]], tuple[str, list[int]]] = {}
        self._strip = [t for t in {*self.tokenizer.all_special_tokens, self.image_token} if t]
        log.info(
            "loaded %s %s revision=%s on %s (%s), batch %d, reuse %s",
            self.name,
            model,
            revision,
            settings.device,
            settings.dtype,
            settings.batch_size,
            settings.reuse,
        )

    # -- family hooks ---------------------------------------------------------------------------

    def chat_text(self, pieces: list[str | int]) -> str:
        """The user turn (text pieces, ints = image slots) rendered through the chat template,
        ending where the assistant's answer begins."""
        raise NotImplementedError

    def encode_images(self, images: list[Image.Image]) -> list[ImageFeatures]:
        """Vision features of each image, in order (one vision-tower call)."""
        raise NotImplementedError

    def position_ids(self, ids: torch.Tensor, feats: list[ImageFeatures]) -> torch.Tensor:
        """Positions of one unpadded row (CPU ids) as [position_dims, length]."""
        return torch.arange(ids.shape[0]).unsqueeze(0)

    # -- Judge protocol ---------------------------------------------------------------------------

    def choice_probs(
        self, requests: Sequence[JudgeRequest], choices: Sequence[str]
    ) -> list[dict[str, float]]:
        """P(first token of each choice) after each request's prompt and answer prefix (not renormalised)."""
        with self._lock:
            rows = [self._row(r, tuple(choices)) for r in requests]
            order = list(range(len(rows)))
            if self.settings.reuse:  # a query's comparisons side by side: they share the prefix
                order.sort(key=lambda i: (str(rows[i].images[0]), rows[i].text))
            out: list[dict[str, float]] = [{} for _ in rows]
            for start in range(0, len(order), self.settings.batch_size):
                part = order[start : start + self.settings.batch_size]
                logprobs = self.next_token_logprobs([rows[i] for i in part])
                if not torch.isfinite(logprobs).all():  # e.g. an fp16 overflow: never a silent verdict
                    raise FloatingPointError("the model's next-token log-probabilities are not finite")
                ids = torch.tensor([rows[i].answer_ids for i in part], device=logprobs.device)
                picked = logprobs.gather(1, ids).exp().tolist()
                for i, values in zip(part, picked, strict=True):
                    out[i] = dict(zip(choices, values, strict=True))
            return out

    def generate(self, requests: Sequence[JudgeRequest], max_new_tokens: int) -> list[str]:
        """Greedy decoding of the assistant turn (after any answer prefix); the new text only."""
        with self._lock:
            rows = [self._row(r, None) for r in requests]
            texts: list[str] = []
            # The checkpoint's own settings (e.g. Qwen's repetition_penalty 1.05) apply, as they do
            # in the paper's code; decoding is greedy, so the sampling knobs are cleared.
            config = copy.deepcopy(self.hf.generation_config)
            config.max_new_tokens = max_new_tokens
            config.do_sample = False
            config.temperature = config.top_p = config.top_k = None
            config.pad_token_id = self.pad_token_id
            for start in range(0, len(rows), self.settings.batch_size):
                part = rows[start : start + self.settings.batch_size]
                inputs = self._processor_inputs(part)
                with torch.inference_mode():
                    out = self.hf.generate(**inputs, generation_config=config)
                new = out[:, inputs["input_ids"].shape[1] :]
                texts.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
            return [t.strip() for t in texts]

    # -- scoring ----------------------------------------------------------------------------------

    def next_token_logprobs(self, rows: list[_Row]) -> torch.Tensor:
        """[rows, vocab] float32 log-probabilities of the next token after each row's text."""
        if self.settings.reuse:
            return self._logprobs_reuse(rows)
        return self._logprobs_plain(rows)

    def _logprobs_plain(self, rows: list[_Row]) -> torch.Tensor:
        inputs = self._processor_inputs(rows)
        with torch.inference_mode():  # no cache: only the last position is read
            logits = self.hf(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
        return logits.float().log_softmax(-1)

    def _processor_inputs(self, rows: list[_Row]) -> dict[str, torch.Tensor]:
        """Left-padded processor outputs, all of them, on the model's device."""
        images = [[load_image(p) for p in r.images] for r in rows]
        inputs = self.processor(images=images, text=[r.text for r in rows], padding=True, return_tensors="pt")
        return {
            k: v.to(self.device, self.dtype) if torch.is_floating_point(v) else v.to(self.device)
            for k, v in inputs.items()
        }

    def _logprobs_reuse(self, rows: list[_Row]) -> torch.Tensor:
        feats = self._row_features(rows)
        ids = self._expanded_ids(rows, feats)
        cuts = [self._prefix_end(row_ids) for row_ids in ids]
        positions = [self.position_ids(row_ids, f) for row_ids, f in zip(ids, feats, strict=True)]

        # Rows with the same prefix tokens and ground image share one prefix computation.
        group_of: dict[tuple, int] = {}
        row_group: list[int] = []
        first_row: list[int] = []
        for r, (row_ids, cut) in enumerate(zip(ids, cuts, strict=True)):
            key = (tuple(row_ids[:cut].tolist()), image_key(rows[r].images[0]))
            if key not in group_of:
                group_of[key] = len(first_row)
                first_row.append(r)
            row_group.append(group_of[key])

        cache_kw = {}
        prefix_mask = None
        if any(cuts):
            prefix = [(ids[r][: cuts[r]], positions[r][:, : cuts[r]], feats[r][:1]) for r in first_row]
            p_ids, p_mask, p_pos = self._pad(prefix, left=True)
            with torch.inference_mode():
                out = self.hf.model(
                    input_ids=p_ids,
                    attention_mask=p_mask,
                    position_ids=p_pos,
                    mm_encoder_outputs=self._mm([f for _, _, fs in prefix for f in fs]),
                    use_cache=True,
                )
            cache = out.cache
            select = torch.tensor(row_group, device=self.device)
            cache.batch_select_indices(select)
            _keep_prefix_only(cache)
            prefix_mask = p_mask[select]
            cache_kw["cache"] = cache

        suffix = [
            (ids[r][cuts[r] :], positions[r][:, cuts[r] :], feats[r][1 if cuts[r] else 0 :])
            for r in range(len(rows))
        ]
        s_ids, s_mask, s_pos = self._pad(suffix, left=False)
        mask = s_mask if prefix_mask is None else torch.cat([prefix_mask, s_mask], dim=1)
        with torch.inference_mode():
            out = self.hf.model(
                input_ids=s_ids,
                attention_mask=mask,
                position_ids=s_pos,
                mm_encoder_outputs=self._mm([f for _, _, fs in suffix for f in fs]),
                **cache_kw,
            )
            last = s_mask.sum(dim=1) - 1  # right padding: each row's last real token
            hidden = out.last_hidden_state[torch.arange(len(rows), device=self.device), last]
            logits = self.hf.lm_head(hidden)
        return logits.float().log_softmax(-1)

    def _prefix_end(self, ids: torch.Tensor) -> int:
        """Index just after the first image's tokens (the ground panorama); 0 if there is none."""
        is_image = ids == self.image_token_id
        if not bool(is_image.any()):
            return 0
        start = int(is_image.to(torch.uint8).argmax())
        after = (~is_image[start:]).nonzero()
        return start + int(after[0]) if after.numel() else int(ids.shape[0])

    def _pad(
        self, parts: list[tuple[torch.Tensor, torch.Tensor, Any]], left: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stack (ids, positions) rows, padded on the left or right, with their attention mask.

        Built on the CPU (where the rows are) and moved to the model's device in one copy each.
        """
        width = max(p[0].shape[0] for p in parts)
        n = len(parts)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        pos = torch.ones((self.position_dims, n, width), dtype=torch.long)
        for r, (row_ids, row_pos, _) in enumerate(parts):
            k = row_ids.shape[0]
            span = slice(width - k, width) if left else slice(0, k)
            ids[r, span] = row_ids
            mask[r, span] = 1
            pos[:, r, span] = row_pos
        pos = pos[0] if self.position_dims == 1 else pos
        return ids.to(self.device), mask.to(self.device), pos.to(self.device)

    @staticmethod
    def _mm(feats: list[ImageFeatures]) -> dict[str, BaseModelOutputWithPooling] | None:
        if not feats:
            return None
        return {"image": BaseModelOutputWithPooling(pooler_output=[f.embeds for f in feats])}

    def _row_features(self, rows: list[_Row]) -> list[list[ImageFeatures]]:
        """Each row's image features, from the cache or one vision-tower pass over the misses."""
        keys = [[image_key(p) for p in r.images] for r in rows]
        found: dict[tuple, ImageFeatures] = {}
        missing: dict[tuple, Path] = {}
        for r, row_keys in zip(rows, keys, strict=True):
            for path, key in zip(r.images, row_keys, strict=True):
                if key in found or key in missing:
                    continue
                cached = self.features.get(key)
                if cached is None:
                    missing[key] = path
                else:
                    found[key] = cached
        todo = list(missing.items())
        images = [load_image(path) for _, path in todo]  # all decoded before any GPU work
        for start in range(0, len(todo), VISION_CHUNK):
            with torch.inference_mode():
                encoded = self.encode_images(images[start : start + VISION_CHUNK])
            for (key, _), feats in zip(todo[start : start + VISION_CHUNK], encoded, strict=True):
                found[key] = feats
                self.features.put(key, feats)
        return [[found[k] for k in row_keys] for row_keys in keys]

    def _expanded_ids(self, rows: list[_Row], feats: list[list[ImageFeatures]]) -> list[torch.Tensor]:
        """Token ids with each image placeholder repeated once per vision feature, as the processor does."""
        texts = []
        for r, f in zip(rows, feats, strict=True):
            pieces = r.text.split(self.image_token)
            if len(pieces) != len(f) + 1:
                raise ValueError(f"the prompt holds {len(pieces) - 1} image slots for {len(f)} images")
            out = [pieces[0]]
            for piece, image in zip(pieces[1:], f, strict=True):
                out.append(self.image_token * image.n_tokens + piece)
            texts.append("".join(out))
        encoded = self.tokenizer(texts)["input_ids"]
        return [torch.tensor(e, dtype=torch.long) for e in encoded]  # CPU: bookkeeping only

    # -- prompts ----------------------------------------------------------------------------------

    def _row(self, request: JudgeRequest, choices: tuple[str, ...] | None) -> _Row:
        chat = self._chat_texts.get(request.prompt)
        if chat is None:
            chat = self._chat_texts[request.prompt] = self.chat_text(split_prompt(request.prompt))
        prefix = request.answer_prefix
        for token in self._strip:  # generated text is re-read as text, never as image slots
            prefix = prefix.replace(token, "")
        text = join_answer_prefix(chat, prefix)
        if text.count(self.image_token) != len(request.images):
            raise ValueError(
                f"the prompt has {text.count(self.image_token)} image slots for {len(request.images)} images"
            )
        if choices is None:
            return _Row(text, request.images)
        key = (text, choices)
        if key not in self._answers:
            if len(self._answers) > 4096:
                self._answers.clear()
            self._answers[key] = answer_token_ids(self.tokenizer, text, choices)
        scored, ids = self._answers[key]
        return _Row(scored, request.images, ids)


def _keep_prefix_only(cache: Any) -> None:
    """Let the suffix pass attend to the cached prefix without storing its own keys and values.

    A DynamicLayer appends every update, so the suffix of a whole batch would stay in memory
    until the pass ends (about 0.5 MB per token for a 7B Llama); reading and not keeping is
    the same arithmetic. Layers of another kind keep their own behaviour.
    """
    from transformers.cache_utils import DynamicLayer

    def read_only(layer: Any) -> Any:
        def update(key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            return (
                torch.cat([layer.keys, key_states], dim=-2),
                torch.cat([layer.values, value_states], dim=-2),
            )

        return update

    for layer in cache.layers:
        if type(layer) is DynamicLayer and layer.get_seq_length() > 0:
            layer.update = read_only(layer)
