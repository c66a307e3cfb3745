"""Hugging Face vision-language judges: what LLaVA-1.5 and Qwen2.5-VL share.

A judge loads one checkpoint (hub id or local folder) with ``from_pretrained``, once per worker
process, bf16 on a GPU and fp32 on the CPU. ``choice_probs`` reads next-token probabilities in one
forward pass per judgment; ``generate`` decodes greedily. The family modules (``llava.py``,
``qwen_vl.py``) say how a prompt is rendered, how an image becomes vision features and where
those features sit in the sequence.

Two ways to run a batch, over the same tokens:

- plain (``CVGL_VLM_REUSE=0``): the processor builds left-padded inputs (every output passed
  through, Qwen's ``mm_token_type_ids`` included) and the model runs them whole; ``generate`` is
  transformers' own. The reference the tests hold the other way to.
- reuse (the default): every image is encoded once per process (``features.py``); the prompt is
  cut after the ground panorama (level 1) and, when two tiles follow, after the first-shown tile
  (level 2); each level's keys and values are computed once and kept on the device across
  batches and rounds (``prefix_kv.py``), so a comparison runs only its second tile and the
  question. Requests are ordered by (query, prompt, first tile) before batches are cut.
  ``generate`` decodes greedily on top of the same prefixes, with the checkpoint's own logits
  processors (e.g. Qwen's repetition penalty), token for token as transformers' ``generate``.

A batch that runs out of GPU memory gives the prefix cache a quarter of its room back and is split
in two and retried; the size that fits is kept and logged. A fine-tuned judge (``adapter``, from
``orchestrator finetune``) has its LoRA adapter checked against its stored hash and merged into the
weights on load (``adapters.py``): both paths run unchanged, and the revision it stores names the
base revision and the adapter hash.
The unit tests hold reuse to plain and a batch to one-at-a-time within 1e-4 in fp32.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from PIL import Image

from workers.judges.adapters import adapted_revision, merge_adapter
from workers.judges.answer_tokens import answer_token_ids, join_answer_prefix
from workers.judges.base import JudgeRequest
from workers.judges.checkpoint import check_family, resolve_checkpoint
from workers.judges.features import FeatureCache, ImageFeatures
from workers.judges.images import image_key, load_image, map_images
from workers.judges.prefix_kv import BatchPast, PrefixCache, PrefixKV, cache_keyword, prefix_key
from workers.judges.settings import DTYPES, VLMSettings
from workers.prompts import split_prompt

log = logging.getLogger(__name__)

VISION_CHUNK = 16  # images per vision-tower call when filling the feature cache
PREFIX_LEVELS = 2  # level 1: up to the ground panorama; level 2: up to the first-shown tile
# On running out of GPU memory the prefix cache gives back this share of its bound.
OOM_CACHE_GIVEBACK = 0.25

T = TypeVar("T")


@dataclass
class _Row:
    """One request made ready for the tokenizer."""

    text: str  # the whole prompt text: chat turn, forced answer start, image placeholders
    images: tuple[Path, ...]
    answer_ids: list[int]


@dataclass
class _Seq:
    """One request as token ids, positions and image features, cut into prefix levels."""

    row: _Row
    ids: torch.Tensor  # [tokens], CPU
    pos: torch.Tensor  # [position_dims, tokens], CPU
    feats: list[ImageFeatures]
    spans: list[tuple[int, int]]  # token span of each image
    cuts: list[int]  # end of each prefix level; the rest (the suffix) is run per request
    keys: list[tuple]  # prefix cache key of each level

    def segment(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, list[ImageFeatures]]:
        feats = [f for f, (a, b) in zip(self.feats, self.spans, strict=True) if start <= a and b <= end]
        return self.ids[start:end], self.pos[:, start:end], feats

    @property
    def sort_key(self) -> tuple:
        # (query and prompt, first-shown tile): comparisons that share a prefix sit side by side.
        levels = [self.keys[i] if i < len(self.keys) else () for i in range(PREFIX_LEVELS)]
        return (*levels, self.row.text)


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
        prefix_cache_mb: float | None = None,
        loader_threads: int | None = None,
        adapter: str | None = None,
        adapter_sha256: str | None = None,
    ) -> None:
        settings = VLMSettings.resolve(
            device, dtype, batch_size, reuse, feature_cache_mb, prefix_cache_mb, loader_threads
        )
        check_family(self.name, model, revision)
        load_revision, stored_revision = resolve_checkpoint(model, revision)
        import transformers
        from transformers import AutoProcessor

        model_cls = getattr(transformers, self.model_class)
        processor = AutoProcessor.from_pretrained(model, revision=load_revision)
        hf_model = model_cls.from_pretrained(model, revision=load_revision, dtype=DTYPES[settings.dtype])
        if adapter:  # a fine-tuned judge (orchestrator finetune): merged, so every path runs unchanged
            hf_model, sha256 = merge_adapter(hf_model, adapter, adapter_sha256)
            stored_revision = adapted_revision(stored_revision, sha256)
        self._setup(hf_model, processor, model, stored_revision, settings)

    @classmethod
    def from_loaded(
        cls, hf_model: Any, processor: Any, model: str, revision: str, **settings: Any
    ) -> HFVisionJudge:
        """Wrap a model built in memory (benchmarks with random 7B-shaped weights)."""
        judge = cls.__new__(cls)
        resolved = VLMSettings.resolve(**settings)
        judge._setup(hf_model.to(DTYPES[resolved.dtype]), processor, model, revision, resolved)
        return judge

    def _setup(self, hf_model: Any, processor: Any, model: str, revision: str, settings: VLMSettings) -> None:
        self.model = model
        self.revision = revision
        self.settings = settings
        self.device = torch.device(settings.device)
        self.dtype = DTYPES[settings.dtype]
        self.hf = hf_model.to(self.device).eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # Left padding: the last position is every row's next token (plain batches and generate).
        self.tokenizer.padding_side = "left"
        self.image_token = processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        # The parts the reuse path drives itself: embeddings, language model, head.
        self.embed = self.hf.get_input_embeddings()
        self.language_model = self.hf.model.language_model
        self.lm_head = self.hf.get_output_embeddings()
        self._cache_kw = cache_keyword(self.language_model)
        text = self.hf.config.get_text_config()
        self._kv_shape = dict(
            layers=text.num_hidden_layers,
            kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        )
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        self.features = FeatureCache(settings.cache_bytes("features", free))
        self.prefixes = PrefixCache(settings.cache_bytes("prefix", free))
        self.batch_cap = settings.batch_size  # lowered for good when a batch runs out of GPU memory
        self.oom_splits = 0
        # Rows, tokens and passes per level ("level1", "level2", "suffix"), reused levels, images
        # encoded: what the reuse saved, for benchmarks and ``inspect gpu``.
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._chat_texts: dict[str, str] = {}
        self._answers: dict[tuple[str, tuple[str, ...]], tuple[str, list[int]]] = {}
        self._slot_ids: dict[str, torch.Tensor] = {}
        self._positions: dict[tuple, torch.Tensor] = {}
        self._strip = [t for t in {*self.tokenizer.all_special_tokens, self.image_token} if t]
        log.info(
            "loaded %s %s revision=%s on %s (%s), batch %d, reuse %s, caches: features %.0f MiB, prefixes %.0f MiB",
            self.name,
            model,
            revision,
            settings.device,
            settings.dtype,
            settings.batch_size,
            settings.reuse,
            self.features.max_bytes / 2**20,
            self.prefixes.max_bytes / 2**20,
        )

    # -- family hooks ---------------------------------------------------------------------------

    def chat_text(self, pieces: list[str | int]) -> str:
        """The user turn (text pieces, ints = image slots) rendered through the chat template,
        ending where the assistant's answer begins."""
        raise NotImplementedError

    def preprocess(self, image: Image.Image) -> Any:
        """The processor's tensors for one image (CPU; called from several threads at once)."""
        raise NotImplementedError

    def encode(self, prepared: list[Any]) -> list[ImageFeatures]:
        """Vision features of preprocessed images, in order (one vision-tower call)."""
        raise NotImplementedError

    def position_ids(self, ids: torch.Tensor, feats: list[ImageFeatures]) -> torch.Tensor:
        """Positions of one unpadded sequence (CPU ids) as [position_dims, length]."""
        return torch.arange(ids.shape[0]).unsqueeze(0)

    def encode_images(self, images: list[Image.Image]) -> list[ImageFeatures]:
        """Vision features of decoded images (one vision-tower call)."""
        return self.encode([self.preprocess(img) for img in images])

    # -- Judge protocol ---------------------------------------------------------------------------

    def choice_probs(
        self, requests: Sequence[JudgeRequest], choices: Sequence[str]
    ) -> list[dict[str, float]]:
        """P(token of each choice) after each request's prompt and answer prefix (not renormalised)."""
        with self._lock:
            rows = [self._row(r, tuple(choices)) for r in requests]
            if self.settings.reuse:
                seqs = self._sequences(rows)
                order = sorted(range(len(seqs)), key=lambda i: seqs[i].sort_key)
                picked = self._in_batches(
                    [seqs[i] for i in order],
                    lambda part: _pick(self._logprobs_reuse(part), [s.row for s in part]),
                )
            else:
                order = list(range(len(rows)))
                picked = self._in_batches(rows, lambda part: _pick(self._logprobs_plain(part), part))
            out: list[dict[str, float]] = [{} for _ in rows]
            for i, values in zip(order, picked, strict=True):
                out[i] = dict(zip(choices, values, strict=True))
            return out

    def generate(self, requests: Sequence[JudgeRequest], max_new_tokens: int) -> list[str]:
        """Greedy decoding of the assistant turn (after any answer prefix); the new text only."""
        with self._lock:
            rows = [self._row(r, None) for r in requests]
            # The checkpoint's own settings (e.g. Qwen's repetition_penalty 1.05) apply, as they do
            # in the paper's code; decoding is greedy, so the sampling knobs are cleared.
            config = copy.deepcopy(self.hf.generation_config)
            config.max_new_tokens = max_new_tokens
            config.do_sample = False
            config.temperature = config.top_p = config.top_k = None
            config.pad_token_id = self.pad_token_id
            if self.settings.reuse:
                seqs = self._sequences(rows)
                texts = self._in_batches(seqs, lambda part: self._generate_reuse(part, config))
            else:
                texts = self._in_batches(rows, lambda part: self._generate_plain(part, config))
            return [t.strip() for t in texts]

    def answer_inputs(
        self, requests: Sequence[JudgeRequest], choices: Sequence[str]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The model inputs of ``requests`` (decoded, preprocessed, on the device) and each one's
        answer token ids [requests, choices]: what ``answer_logprobs`` runs, prepared apart so that a
        training loop prepares the next batch while the model works on this one."""
        rows = [self._row(r, tuple(choices)) for r in requests]
        return self._processor_inputs(rows), torch.tensor([r.answer_ids for r in rows], device=self.device)

    def answer_logprobs(
        self,
        requests: Sequence[JudgeRequest],
        choices: Sequence[str],
        prepared: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """[requests, choices] log-probabilities of each choice's token after each request's prompt
        and answer prefix, over the whole vocabulary: the plain path, differentiable. The
        fine-tune's loss and validation accuracy read it (``workers/training``), so a model is
        trained on exactly the tokens it is later asked with. ``prepared``: ``answer_inputs``'s."""
        inputs, answer_ids = prepared if prepared is not None else self.answer_inputs(requests, choices)
        logits = self.hf(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
        return logits.float().log_softmax(-1).gather(1, answer_ids)

    def stats(self) -> dict[str, Any]:
        """Cache, batch and work figures for benchmarks and ``inspect gpu``."""
        return {
            "features": self.features.stats(),
            "prefixes": self.prefixes.stats(),
            "batch_size": self.settings.batch_size,
            "batch_cap": self.batch_cap,
            "oom_splits": self.oom_splits,
            "work": dict(self.counters),
        }

    # -- batches and running out of memory --------------------------------------------------------

    def _in_batches(self, items: Sequence[T], run: Callable[[list[T]], Any]) -> list[Any]:
        """``run`` over consecutive parts of at most ``batch_cap`` items; results flattened in order."""
        out: list[Any] = []
        start = 0
        while start < len(items):
            part = list(items[start : start + self.batch_cap])
            out.extend(self._fit(part, run))
            start += len(part)
        return out

    def _fit(self, part: list[T], run: Callable[[list[T]], Any], cleared: bool = False) -> list[Any]:
        """Run a part; out of GPU memory, free room and split it in two (a part of one: free everything once)."""
        try:
            return list(run(part))
        except torch.OutOfMemoryError:
            self.oom_splits += 1
            if len(part) == 1:
                if cleared:
                    raise
                self.prefixes.clear()
                self.features.clear()
                self._empty_device_cache()
                return self._fit(part, run, cleared=True)
            self.prefixes.max_bytes = int(self.prefixes.max_bytes * (1 - OOM_CACHE_GIVEBACK))
            self.prefixes.shrink_to(self.prefixes.max_bytes)
            self._empty_device_cache()
            half = (len(part) + 1) // 2
            if half < self.batch_cap:
                log.warning(
                    "out of GPU memory with %d judgments per forward pass: continuing with %d "
                    "(prefix cache bound now %.0f MiB)",
                    len(part),
                    half,
                    self.prefixes.max_bytes / 2**20,
                )
                self.batch_cap = half
            return self._fit(part[:half], run) + self._fit(part[half:], run)

    def _empty_device_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- the plain path -----------------------------------------------------------------------------

    def _processor_inputs(self, rows: list[_Row]) -> dict[str, torch.Tensor]:
        """Left-padded processor outputs, all of them, on the model's device."""
        images = [[load_image(p) for p in r.images] for r in rows]
        inputs = self.processor(images=images, text=[r.text for r in rows], padding=True, return_tensors="pt")
        return {
            k: v.to(self.device, self.dtype) if torch.is_floating_point(v) else v.to(self.device)
            for k, v in inputs.items()
        }

    def _logprobs_plain(self, rows: list[_Row]) -> torch.Tensor:
        inputs = self._processor_inputs(rows)
        with torch.inference_mode():  # no cache: only the last position is read
            logits = self.hf(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
        return logits.float().log_softmax(-1)

    def _generate_plain(self, rows: list[_Row], config: Any) -> list[str]:
        inputs = self._processor_inputs(rows)
        with torch.inference_mode():
            out = self.hf.generate(**inputs, generation_config=config)
        return self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    # -- the reuse path -----------------------------------------------------------------------------

    def _logprobs_reuse(self, seqs: list[_Seq]) -> torch.Tensor:
        with torch.inference_mode():
            hidden, _, _ = self._run_suffixes(seqs)
            return self.lm_head(hidden).float().log_softmax(-1)

    def _run_suffixes(self, seqs: list[_Seq]) -> tuple[torch.Tensor, torch.Tensor, BatchPast]:
        """Each request's tokens after its last prefix level, on top of its cached levels."""
        entries = self._prefixes(seqs)
        suffixes = [s.segment(s.cuts[-1] if s.cuts else 0, len(s.ids)) for s in seqs]
        past = self._batch_past([[entries[k] for k in s.keys] for s in seqs], _width(suffixes))
        hidden, mask = self._forward(suffixes, past, "suffix")
        return hidden, mask, past

    def _generate_reuse(self, seqs: list[_Seq], config: Any) -> list[str]:
        """Greedy decoding as transformers' ``generate`` does it, on top of the cached prefixes."""
        n = len(seqs)
        with torch.inference_mode():
            hidden, new_mask, past = self._run_suffixes(seqs)
            cache = past.full_cache(new_mask.shape[1])
            mask = torch.cat([past.mask, new_mask], dim=1)
            # What the logits processors see as the sequence so far: each row's own ids (a short row
            # is filled with its own first id, which changes nothing a processor computes).
            width = max(len(s.ids) for s in seqs)
            history = torch.stack([torch.cat([s.ids, s.ids[:1].expand(width - len(s.ids))]) for s in seqs])
            history = history.to(self.device)
            processors = self.hf._get_logits_processor(
                generation_config=config,
                input_ids_seq_length=history.shape[1],
                encoder_input_ids=history,
                device=self.device,
            )
            eos = config.eos_token_id
            eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=self.device)
            nxt = torch.tensor([int(s.pos[:, -1].max()) + 1 for s in seqs], device=self.device)
            done = torch.zeros(n, dtype=torch.bool, device=self.device)
            logits = self.lm_head(hidden).float()
            new: list[torch.Tensor] = []
            for step in range(config.max_new_tokens):
                token = processors(history, logits).argmax(-1)
                token = torch.where(done, torch.full_like(token, self.pad_token_id), token)
                new.append(token)
                history = torch.cat([history, token[:, None]], dim=1)
                done |= torch.isin(token, eos)
                if bool(done.all()) or step + 1 == config.max_new_tokens:
                    break
                mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=self.device)], dim=1)
                pos = (nxt + step).view(1, n, 1).expand(self.position_dims, n, 1)
                out = self.language_model(
                    inputs_embeds=self.embed(token[:, None]),
                    attention_mask=mask,
                    position_ids=pos[0] if self.position_dims == 1 else pos,
                    use_cache=True,
                    **{self._cache_kw: cache},
                )
                logits = self.lm_head(out[0][:, -1]).float()
            self.counters["generated_tokens"] += n * len(new)
        tokens = torch.stack(new, dim=1) if new else torch.zeros((n, 0), dtype=torch.long)
        return self.tokenizer.batch_decode(tokens.cpu(), skip_special_tokens=True)

    def _batch_past(self, rows: list[list[PrefixKV]], room: int) -> BatchPast:
        return BatchPast(rows, room=room, dtype=self.dtype, device=self.device, **self._kv_shape)

    def _prefixes(self, seqs: list[_Seq]) -> dict[tuple, PrefixKV]:
        """Every prefix level of ``seqs``: looked up, and the missing ones computed level by level
        on top of the level before (one forward pass per level for all of them). Held here as well
        as in the cache, so a small cache never drops one this batch still needs."""
        entries: dict[tuple, PrefixKV] = {}
        for level in range(max((len(s.keys) for s in seqs), default=0)):
            missing: dict[tuple, _Seq] = {}
            for s in seqs:
                if len(s.keys) <= level or s.keys[level] in entries or s.keys[level] in missing:
                    continue
                got = self.prefixes.get(s.keys[level])
                if got is None:
                    missing[s.keys[level]] = s
                else:
                    entries[s.keys[level]] = got
                    self.counters[f"level{level + 1}_reused"] += 1
            if not missing:
                continue
            todo = list(missing.values())
            start = [s.cuts[level - 1] if level else 0 for s in todo]
            segments = [s.segment(a, s.cuts[level]) for s, a in zip(todo, start, strict=True)]
            past = self._batch_past([[entries[k] for k in s.keys[:level]] for s in todo], _width(segments))
            self._forward(segments, past, f"level{level + 1}")
            for r, (s, a) in enumerate(zip(todo, start, strict=True)):
                entry = past.added(r, s.cuts[level] - a)
                entries[s.keys[level]] = entry
                self.prefixes.put(s.keys[level], entry)
        return entries

    def _forward(
        self,
        segments: list[tuple[torch.Tensor, torch.Tensor, list[ImageFeatures]]],
        past: BatchPast,
        what: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run each row's new tokens (right-padded) on top of its past, writing their keys and values
        into the past's room; the hidden state of each row's last new token [rows, hidden] and the
        new tokens' mask [rows, width]. ``what`` names the pass in the counters."""
        n = len(segments)
        width = _width(segments)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        pos = torch.ones((self.position_dims, n, width), dtype=torch.long)
        for r, (row_ids, row_pos, _) in enumerate(segments):
            k = row_ids.shape[0]
            ids[r, :k] = row_ids
            mask[r, :k] = 1
            pos[:, r, :k] = row_pos
        self.counters[f"{what}_rows"] += n
        self.counters[f"{what}_tokens"] += int(mask.sum())
        self.counters[f"{what}_passes"] += 1
        ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
        embeds = self.embed(ids)
        feats = [f.embeds for _, _, fs in segments for f in fs]
        if feats:
            slots = ids == self.image_token_id
            flat = torch.cat(feats).to(embeds.dtype)
            if int(slots.sum()) != flat.shape[0]:
                raise ValueError(f"{int(slots.sum())} image tokens for {flat.shape[0]} image features")
            embeds = embeds.masked_scatter(slots[..., None], flat)
        out = self.language_model(
            inputs_embeds=embeds,
            attention_mask=torch.cat([past.mask, mask], dim=1),
            position_ids=pos[0] if self.position_dims == 1 else pos,
            use_cache=True,
            **{self._cache_kw: past.cache()},
        )
        last = mask.sum(dim=1) - 1  # right padding: each row's last real token
        return out[0][torch.arange(n, device=self.device), last], mask

    # -- requests as sequences ----------------------------------------------------------------------

    def _sequences(self, rows: list[_Row]) -> list[_Seq]:
        feats = self._features(rows)
        ids = self._expanded_ids(rows, feats)
        seqs = []
        for row, row_ids, row_feats in zip(rows, ids, feats, strict=True):
            spans = self._image_spans(row_ids, row_feats)
            # A level ends after each image but the last (up to two levels; a lone image ends one),
            # and never at the very end: something must be left to run per request.
            levels = min(PREFIX_LEVELS, len(spans) - 1) if len(spans) > 1 else len(spans)
            cuts = [end for _, end in spans[:levels] if end < len(row_ids)]
            image_keys = [image_key(p) for p in row.images]
            keys = [
                prefix_key(self.revision, row_ids[:cut], image_keys[: level + 1])
                for level, cut in enumerate(cuts)
            ]
            shape_key = (row.text, tuple(_shape(f) for f in row_feats))
            pos = self._positions.get(shape_key)
            if pos is None:  # the same for every request of a prompt and image sizes
                if len(self._positions) > 4096:
                    self._positions.clear()
                pos = self._positions[shape_key] = self.position_ids(row_ids, row_feats)
            seqs.append(_Seq(row, row_ids, pos, row_feats, spans, cuts, keys))
        return seqs

    def _image_spans(self, ids: torch.Tensor, feats: list[ImageFeatures]) -> list[tuple[int, int]]:
        """Token span of each image: its features fill the next ``n_tokens`` image slots."""
        slots = (ids == self.image_token_id).nonzero().flatten().tolist()
        spans, at = [], 0
        for f in feats:
            part = slots[at : at + f.n_tokens]
            if len(part) != f.n_tokens or part[-1] - part[0] + 1 != f.n_tokens:
                raise ValueError(f"the prompt's image slots do not match {len(feats)} images' features")
            spans.append((part[0], part[-1] + 1))
            at += f.n_tokens
        return spans

    def _features(self, rows: list[_Row]) -> list[list[ImageFeatures]]:
        """Each row's image features, from the cache or the vision tower (misses decoded in threads)."""
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
        # Decoded a chunk at a time (its header checked first, images.py): memory stays bounded
        # whatever the batch holds; a bad file fails the batch, then retried one at a time.
        for start in range(0, len(todo), VISION_CHUNK):
            chunk = todo[start : start + VISION_CHUNK]
            prepared = map_images(
                lambda path: self.preprocess(load_image(path)),
                [p for _, p in chunk],
                self.settings.loader_threads,
            )
            with torch.inference_mode():
                encoded = self.encode(prepared)
            self.counters["images_encoded"] += len(chunk)
            for (key, _), feats in zip(chunk, encoded, strict=True):
                found[key] = feats
                self.features.put(key, feats)
        return [[found[k] for k in row_keys] for row_keys in keys]

    def _expanded_ids(self, rows: list[_Row], feats: list[list[ImageFeatures]]) -> list[torch.Tensor]:
        """Token ids with each image slot repeated once per vision feature, as the processor does.

        A prompt text is tokenized once with one slot per image (the slot is a special token, so
        the text around it tokenizes the same either way), then each slot is repeated.
        """
        out = []
        for r, f in zip(rows, feats, strict=True):
            base = self._slot_ids.get(r.text)
            if base is None:
                if len(self._slot_ids) > 4096:
                    self._slot_ids.clear()
                base = self._slot_ids[r.text] = torch.tensor(
                    self.tokenizer(r.text)["input_ids"], dtype=torch.long
                )
            slots = base == self.image_token_id
            if int(slots.sum()) != len(f):
                raise ValueError(f"the prompt holds {int(slots.sum())} image slots for {len(f)} images")
            repeats = torch.ones_like(base)
            repeats[slots] = torch.tensor([image.n_tokens for image in f], dtype=torch.long)
            out.append(base.repeat_interleave(repeats))  # CPU: bookkeeping only
        return out

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
            return _Row(text, request.images, [])
        key = (text, choices)
        if key not in self._answers:
            if len(self._answers) > 4096:
                self._answers.clear()
            self._answers[key] = answer_token_ids(self.tokenizer, text, choices)
        scored, ids = self._answers[key]
        return _Row(scored, request.images, ids)


def _pick(logprobs: torch.Tensor, rows: list[_Row]) -> list[list[float]]:
    """The probabilities of each row's answer tokens, from [rows, vocab] log-probabilities."""
    if not torch.isfinite(logprobs).all():  # e.g. an fp16 overflow: never a silent verdict
        raise FloatingPointError("the model's next-token log-probabilities are not finite")
    ids = torch.tensor([r.answer_ids for r in rows], device=logprobs.device)
    return logprobs.gather(1, ids).exp().tolist()


def _shape(f: ImageFeatures) -> tuple[int, ...]:
    return tuple(int(x) for x in f.grid_thw) if f.grid_thw is not None else (f.n_tokens,)


def _width(segments: Sequence[tuple[torch.Tensor, ...]]) -> int:
    return max(seg[0].shape[0] for seg in segments)
