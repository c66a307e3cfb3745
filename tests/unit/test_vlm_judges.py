"""The LLaVA-1.5 and Qwen2.5-VL judges on tiny random checkpoints loaded from folders (CPU, fp32).

What is held: a batch gives the probabilities of one-at-a-time, the reuse path (feature cache and
ground-prefix key-value cache) gives those of the plain processor path, both within 1e-4; answer
token ids come from the tokenizer; bad images and wrong checkpoints fail clearly.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from db.models import DONE, FAILED
from orchestrator.cli import cli
from tests.tiny_vlms import build_tiny_llava, tiny_checkpoint
from workers import judging, scoring
from workers.judges.answer_tokens import AnswerTokenError, answer_token_ids
from workers.judges.base import JudgeRequest
from workers.judges.checkpoint import folder_revision
from workers.judges.features import FeatureCache
from workers.judges.hf_vlm import HFVisionJudge
from workers.judges.images import BadImage, load_image
from workers.judges.registry import check_model_folder, load_judge
from workers.judges.settings import VLMSettings
from workers.prompts import PAIR, load_prompt

FAMILIES = ["llava", "qwen2.5-vl"]
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.getbasetemp() / "tiny-vlms"
    return {f: tiny_checkpoint(f, base) for f in FAMILIES}


@pytest.fixture(scope="module")
def judges(checkpoints) -> dict[tuple[str, bool], HFVisionJudge]:
    """(family, reuse) -> judge; batch size 4 so that a call spans several forward passes."""
    return {
        (f, reuse): load_judge(f, str(checkpoints[f]), None, device="cpu", batch_size=4, reuse=reuse)
        for f in FAMILIES
        for reuse in (False, True)
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Panoramas (2:1 JPEG), tiles (PNG) of a few sizes, as the synthetic dataset writes them."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    out = {}
    for i in range(3):
        out[f"g{i}"] = d / f"g{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(out[f"g{i}"], quality=90)
    for i in range(6):
        side = 32 if i < 4 else 48
        out[f"t{i}"] = d / f"t{i}.png"
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(out[f"t{i}"])
    return out


def pairwise(images, triples) -> list[JudgeRequest]:
    p = load_prompt("pairwise")
    return [
        JudgeRequest(p.text, (images[g], images[a], images[b]), p.spec.answer_prefix) for g, a, b in triples
    ]


def pointwise(images, name, pairs) -> list[JudgeRequest]:
    p = load_prompt(name)
    return [JudgeRequest(p.text, (images[g], images[t])) for g, t in pairs]


# Comparisons of three queries, interleaved as a task from the coordinator carries them.
TRIPLES = [
    ("g0", "t0", "t1"),
    ("g1", "t0", "t2"),
    ("g0", "t2", "t3"),
    ("g2", "t4", "t5"),
    ("g1", "t3", "t1"),
    ("g0", "t1", "t0"),
    ("g2", "t5", "t0"),
]
PAIRS = [("g0", "t0"), ("g0", "t1"), ("g1", "t0"), ("g2", "t4"), ("g1", "t5"), ("g0", "t5")]


def renormalised(rows, choices):
    return [scoring.normalize(r, tuple(choices)) for r in rows]


def max_diff(a, b, choices, log=False):
    f = math.log if log else (lambda v: v)
    return max(abs(f(x[c]) - f(y[c])) for x, y in zip(a, b, strict=True) for c in choices)


# -- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_from_a_folder_with_a_stable_revision(family, checkpoints, judges, tmp_path):
    judge = judges[(family, True)]
    assert judge.name == family and judge.model == str(checkpoints[family])
    assert judge.revision == folder_revision(checkpoints[family])
    assert judge.revision.startswith("local-") and len(judge.revision) == len("local-") + 12
    assert judge.settings.device == "cpu" and judge.hf.dtype == torch.float32
    copy = shutil.copytree(checkpoints[family], tmp_path / "copy")
    assert folder_revision(copy) == judge.revision  # a copy is the same checkpoint
    other = build_tiny_llava(tmp_path / "other", seed=1)
    assert folder_revision(other) != folder_revision(tmp_path / "copy")


def test_a_hub_id_loads_offline_from_the_cache_and_stores_its_commit(checkpoints, tmp_path, monkeypatch):
    """The hub path as a GPU worker without internet takes it: HF_HUB_OFFLINE=1, weights in the cache."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-llava"
    shutil.copytree(checkpoints["llava"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    judge = load_judge("llava", "acme/tiny-llava", "main", device="cpu")
    assert judge.revision == commit and judge.model == "acme/tiny-llava"
    snapshot = load_judge("llava", str(repo / "snapshots" / commit), None, device="cpu")
    assert snapshot.revision == commit  # a folder inside the cache is named by its commit too
    with pytest.raises(OSError):
        load_judge("llava", "acme/not-cached", "main", device="cpu")


def test_a_checkpoint_of_another_family_is_refused(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="'llava' checkpoint, not Qwen2.5-VL"):
        load_judge("qwen2.5-vl", str(checkpoints["llava"]), None, device="cpu")
    with pytest.raises(ValueError, match="'qwen2_5_vl' checkpoint, not LLaVA-1.5"):
        check_model_folder("llava", str(checkpoints["qwen2.5-vl"]))
    check_model_folder("llava", str(checkpoints["llava"]))  # the right family passes
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        check_model_folder("llava", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="does not exist"):
        check_model_folder("llava", str(tmp_path / "missing"))
    check_model_folder("llava", "llava-hf/llava-1.5-7b-hf")  # a hub id is checked by the worker


def test_submit_refuses_a_folder_of_another_family_in_one_line(checkpoints):
    result = CliRunner().invoke(
        cli, ["submit", "--judge", "qwen2.5-vl", "--model", str(checkpoints["llava"])], catch_exceptions=False
    )
    assert result.exit_code == 1
    assert result.output.strip().startswith("Error: ") and len(result.output.strip().splitlines()) == 1
    assert "'llava' checkpoint, not Qwen2.5-VL" in result.output


def test_settings_come_from_arguments_then_environment(monkeypatch):
    monkeypatch.setenv("CVGL_VLM_BATCH_SIZE", "3")
    monkeypatch.setenv("CVGL_VLM_REUSE", "0")
    s = VLMSettings.resolve(device="cpu")
    assert (s.device, s.dtype, s.batch_size, s.reuse) == ("cpu", "float32", 3, False)
    assert VLMSettings.resolve(device="cpu", batch_size=5, reuse=True).batch_size == 5
    with pytest.raises(ValueError, match="dtype must be one of"):
        VLMSettings.resolve(device="cpu", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no CUDA GPU"):
            VLMSettings.resolve(device="cuda")


# -- exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("reuse", [False, True], ids=["plain", "reuse"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_equals_one_at_a_time(family, reuse, judges, images):
    judge = judges[(family, reuse)]
    reqs = pairwise(images, TRIPLES)
    batch = judge.choice_probs(reqs, PAIR)
    single = [judge.choice_probs([r], PAIR)[0] for r in reqs]
    assert max_diff(batch, single, PAIR, log=True) < TOL
    assert max_diff(renormalised(batch, PAIR), renormalised(single, PAIR), PAIR) < TOL
    firsts = [p["1"] for p in renormalised(batch, PAIR)]
    assert max(firsts) - min(firsts) > 0.01  # the answers differ: a mix-up would show


@pytest.mark.parametrize("prompt", ["pairwise", "yesno", "likert"])
@pytest.mark.parametrize("family", FAMILIES)
def test_reuse_changes_no_probability(family, prompt, judges, images):
    spec = load_prompt(prompt).spec
    reqs = pairwise(images, TRIPLES) if prompt == "pairwise" else pointwise(images, prompt, PAIRS)
    plain = judges[(family, False)].choice_probs(reqs, spec.choices)
    reused = judges[(family, True)].choice_probs(reqs, spec.choices)
    assert max_diff(plain, reused, spec.choices, log=True) < TOL
    assert max_diff(renormalised(plain, spec.choices), renormalised(reused, spec.choices), spec.choices) < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tiles_shown_decide_the_answer(family, judges, images):
    """A control for the equality tests: swapping the tiles moves the answer far beyond 1e-4."""
    judge = judges[(family, True)]
    ab, ba = renormalised(
        judge.choice_probs(pairwise(images, [("g0", "t0", "t2"), ("g0", "t2", "t0")]), PAIR), PAIR
    )
    assert abs(ab["1"] - ba["1"]) > 1e-3


def test_qwen_without_mm_token_type_ids_is_measurably_wrong(judges, images):
    """Why every processor output is passed through: dropping one moves the logits far beyond 1e-4."""
    judge = judges[("qwen2.5-vl", False)]
    rows = [judge._row(r, PAIR) for r in pairwise(images, TRIPLES[:2])]
    inputs = judge._processor_inputs(rows)
    assert "mm_token_type_ids" in inputs
    with torch.inference_mode():
        full = judge.hf(**inputs, logits_to_keep=1).logits[:, -1].log_softmax(-1)
        dropped = (
            judge.hf(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"}, logits_to_keep=1)
            .logits[:, -1]
            .log_softmax(-1)
        )
    assert (full - dropped).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_reuse_encodes_each_image_once_and_computes_each_prefix_once(family, checkpoints, images):
    judge = load_judge(family, str(checkpoints[family]), None, device="cpu", batch_size=8, reuse=True)
    encoded: list[int] = []
    encode = judge.encode
    judge.encode = lambda prepared: (encoded.append(len(prepared)), encode(prepared))[1]
    passes: list[tuple[int, int]] = []  # (rows, cached tokens before the new ones) per forward pass
    hook = judge.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: passes.append(
            (kw["inputs_embeds"].shape[0], kw["attention_mask"].shape[1] - kw["inputs_embeds"].shape[1])
        ),
        with_kwargs=True,
    )
    try:
        reqs = pairwise(images, TRIPLES)
        judge.choice_probs(reqs, PAIR)
        distinct = len({p for r in reqs for p in r.images})
        assert distinct == 9 and sum(encoded) == distinct  # 3 panoramas and 6 tiles; 21 are shown
        firsts = len({(r.images[0], r.images[1]) for r in reqs})
        assert firsts == 7
        # Level 1 once per query (no past), level 2 once per (query, first tile) on top of it,
        # then every comparison on top of both.
        assert [rows for rows, _ in passes] == [3, firsts, len(reqs)]
        assert passes[0][1] == 0 and 0 < passes[1][1] < passes[2][1]
        assert (judge.features.hits, judge.features.misses) == (0, distinct)
        assert (judge.prefixes.hits, judge.prefixes.misses, len(judge.prefixes)) == (
            0,
            3 + firsts,
            3 + firsts,
        )
        encoded.clear()
        passes.clear()
        judge.choice_probs(reqs, PAIR)  # a later round: every image and prefix is cached
        assert encoded == [] and judge.features.hits == distinct
        assert [rows for rows, _ in passes] == [len(reqs)] and judge.prefixes.hits == 3 + firsts
    finally:
        hook.remove()


def test_the_feature_cache_stays_within_its_bound(checkpoints, judges, images):
    judge = load_judge("llava", str(checkpoints["llava"]), None, device="cpu", reuse=True)
    per_image = judge.encode_images([load_image(images["t0"])])[0].nbytes
    judge.features = FeatureCache(int(3.5 * per_image))
    reqs = pairwise(images, TRIPLES)
    got = judge.choice_probs(reqs, PAIR)
    assert len(judge.features) == 3 and judge.features.bytes <= judge.features.max_bytes
    assert max_diff(got, judges[("llava", False)].choice_probs(reqs, PAIR), PAIR, log=True) < TOL


# -- answer tokens ------------------------------------------------------------------------------


def llama_like_tokenizer(prompt: str) -> PreTrainedTokenizerFast:
    """A sentencepiece-style BPE (``▁`` for spaces) where, as in LLaVA-1.5's Llama tokenizer,
    ``▁Yes`` is one token but a digit after a space is ``▁`` + digit."""
    chars = sorted(set(prompt + 'YesNo12345{}"preference: ') - {" "})
    vocab = {"<unk>": 0, "▁": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    merges = [
        ("▁", "Y"),
        ("▁Y", "e"),
        ("▁Ye", "s"),
        ("▁", "N"),
        ("▁N", "o"),
        ("Y", "e"),
        ("Ye", "s"),
        ("N", "o"),
    ]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_answer_ids_follow_the_tokenizer_not_constants():
    prompt = "USER: Is it a match? ASSISTANT:"
    tok = llama_like_tokenizer(prompt)
    text, ids = answer_token_ids(tok, prompt, ["Yes", "No"])
    assert text == prompt and tok.convert_ids_to_tokens(ids) == ["▁Yes", "▁No"]
    # Every " 1".." 5" starts with the same "▁": the space moves into the prompt, bare digits are read.
    text, ids = answer_token_ids(tok, prompt, list("12345"))
    assert text == prompt + " " and tok.convert_ids_to_tokens(ids) == list("12345")
    forced = prompt + ' {"preference": "'
    text, ids = answer_token_ids(tok, forced, ["1", "2"])
    assert text == forced and tok.convert_ids_to_tokens(ids) == ["1", "2"]


def test_answers_that_cannot_be_told_apart_are_an_error(judges):
    tok = judges[("llava", False)].tokenizer
    with pytest.raises(AnswerTokenError, match="unknown token"):
        answer_token_ids(tok, "USER: match? ASSISTANT:", ["Maybe", "No"])
    with pytest.raises(AnswerTokenError, match="the same token"):
        answer_token_ids(tok, "USER: match? ASSISTANT:", ["Yes", "Yes"])


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_render_through_the_chat_template_with_images_in_place(family, judges):
    judge = judges[(family, True)]
    p = load_prompt("pairwise")
    text = judge._row(
        JudgeRequest(p.text, (Path("g"), Path("a"), Path("b")), p.spec.answer_prefix), PAIR
    ).text
    assert text.count(judge.image_token) == 3
    assert text.index("query image") < text.index(judge.image_token) < text.index("satellite image 1")
    if family == "llava":
        assert text.startswith("USER: You are an expert") and text.endswith('ASSISTANT: {"preference": "')
    else:
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
        assert text.endswith('<|im_start|>assistant\n{"preference": "')


# -- generation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_is_greedy_and_batch_independent(family, judges, images):
    judge = judges[(family, False)]
    reqs = pointwise(images, "direct", PAIRS[:4])
    batch = judge.generate(reqs, 6)
    assert batch == [judge.generate([r], 6)[0] for r in reqs]
    assert all(isinstance(t, str) and t and judge.image_token not in t for t in batch)


# -- the procedures of the five prompts ---------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_prompt_mode_runs_and_stores_what_it_read(family, judges, images):
    judge = judges[(family, True)]
    items = lambda reqs: [judging.Item(i + 1, r) for i, r in enumerate(reqs)]  # noqa: E731
    for name in ("yesno", "likert"):
        out = judging.run_batch(judge, load_prompt(name), items(pointwise(images, name, PAIRS)))
        lo, hi = (0.0, 1.0) if name == "yesno" else (1.0, 5.0)
        assert all(o.status == DONE and lo <= o.result["score"] <= hi for o in out)
        assert all(json.loads(o.raw_output).keys() == set(load_prompt(name).spec.choices) for o in out)
    out = judging.run_batch(judge, load_prompt("pairwise"), items(pairwise(images, TRIPLES)))
    assert all(o.status == DONE and abs(o.result["p_first"] + o.result["p_second"] - 1) < 1e-9 for o in out)
    assert all(o.result["first_wins"] == (o.result["p_first"] >= o.result["p_second"]) for o in out)
    # Direct and the paper's pairwise decoding parse text: a random model's text is mostly not a score.
    for name, decode in (("direct", "choices"), ("pairwise", "generate")):
        reqs = pointwise(images, "direct", PAIRS[:2]) if name == "direct" else pairwise(images, TRIPLES[:2])
        for o in judging.run_batch(judge, load_prompt(name), items(reqs), decode=decode):
            assert o.raw_output  # kept either way
            assert o.status == DONE or (o.status == FAILED and o.error.startswith("unparsable answer"))
    out = judging.run_batch(judge, load_prompt("reason"), items(pointwise(images, "reason", PAIRS[:1])))
    for o in out:
        reasoning, probs = o.raw_output.rsplit("\n", 1)
        assert o.status == DONE and reasoning and set(json.loads(probs)) == {"Yes", "No"}


# -- bad input ----------------------------------------------------------------------------------


def test_any_image_mode_is_converted_to_rgb(tmp_path, judges, images):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    base = Image.fromarray(pixels)
    variants = {
        "gray.png": base.convert("L"),
        "rgba.png": base.convert("RGBA"),
        "palette.png": base.convert("P"),
        "cmyk.jpg": base.convert("CMYK"),
        "i16.png": Image.fromarray(pixels[..., 0].astype(np.uint16) * 200),
    }
    paths = []
    for name, img in variants.items():
        img.save(tmp_path / name)
        paths.append(tmp_path / name)
        assert load_image(tmp_path / name).mode == "RGB"
    p = load_prompt("yesno")
    reqs = [JudgeRequest(p.text, (images["g0"], path)) for path in paths]
    for family in FAMILIES:
        probs = judges[(family, True)].choice_probs(reqs, ("Yes", "No"))
        assert all(0 < v < 1 for row in probs for v in row.values())


def test_bad_images_fail_alone_with_a_clear_error(tmp_path, judges, images):
    (tmp_path / "random.png").write_bytes(np.random.default_rng(0).bytes(300))
    good = images["t0"].read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    Image.new("RGB", (400, 10)).save(tmp_path / "strip.png")
    expected = {
        "random.png": "corrupt",
        "cut.png": "corrupt",
        "notes.png": "corrupt",
        "tiny.png": "is 4x4; judges accept sides of 8",
        "strip.png": "is 400x10; judges accept",
    }
    for name, message in expected.items():
        with pytest.raises(BadImage, match=message):
            load_image(tmp_path / name)
    p = load_prompt("yesno")
    reqs = [JudgeRequest(p.text, (images["g0"], images["t1"]))]
    reqs += [JudgeRequest(p.text, (images["g0"], tmp_path / name)) for name in expected]
    reqs += [JudgeRequest(p.text, (images["g1"], images["t2"]))]
    for family in FAMILIES:
        judge = judges[(family, True)]
        out = judging.run_batch(judge, p, [judging.Item(i + 1, r) for i, r in enumerate(reqs)])
        assert [o.status for o in out] == [DONE] + [FAILED] * len(expected) + [DONE]
        for o, (name, message) in zip(out[1:-1], expected.items(), strict=True):
            assert name in o.error and message in o.error  # the file and what is wrong with it
        alone = judge.choice_probs([reqs[0], reqs[-1]], ("Yes", "No"))
        assert abs(out[0].result["score"] - scoring.p_yes(alone[0])) < TOL
        assert abs(out[-1].result["score"] - scoring.p_yes(alone[1])) < TOL


def test_a_request_with_the_wrong_number_of_images_is_refused(judges, images):
    p = load_prompt("pairwise")
    req = JudgeRequest(p.text, (images["g0"], images["t0"]), p.spec.answer_prefix)
    with pytest.raises(ValueError, match="3 image slots for 2 images"):
        judges[("llava", True)].choice_probs([req], PAIR)


def test_non_finite_logits_fail_instead_of_scoring(checkpoints, images):
    judge = load_judge("llava", str(checkpoints["llava"]), None, device="cpu")
    with torch.no_grad():
        judge.hf.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        judge.choice_probs(pointwise(images, "yesno", PAIRS[:1]), ("Yes", "No"))


# -- reuse across rounds, generation, positions, vision attention, memory --------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_a_later_round_from_cached_prefixes_equals_the_plain_path(family, checkpoints, images):
    """Round 2 asks other comparisons of the same queries: levels 1 and 2 come from the cache."""
    judge = load_judge(family, str(checkpoints[family]), None, device="cpu", batch_size=3, reuse=True)
    plain = load_judge(family, str(checkpoints[family]), None, device="cpu", batch_size=3, reuse=False)
    judge.choice_probs(pairwise(images, TRIPLES[:4]), PAIR)  # round 1
    later = [("g0", "t0", "t3"), ("g1", "t0", "t5"), ("g0", "t2", "t0"), ("g2", "t4", "t1")]  # same firsts
    level2_before = judge.counters["level2_rows"]
    got = judge.choice_probs(pairwise(images, later), PAIR)
    assert judge.counters["level2_rows"] == level2_before  # every first-shown tile was cached
    assert judge.counters["level2_reused"] >= 4
    want = plain.choice_probs(pairwise(images, later), PAIR)
    assert max_diff(got, want, PAIR, log=True) < TOL


def test_batches_are_cut_by_query_and_first_tile(checkpoints, images):
    judge = load_judge("llava", str(checkpoints["llava"]), None, device="cpu", batch_size=2, reuse=True)
    seen: list[list[tuple[str, str]]] = []
    run = judge._logprobs_reuse
    judge._logprobs_reuse = lambda part: (
        seen.append([(s.row.images[0].name, s.row.images[1].name) for s in part]),
        run(part),
    )[1]
    interleaved = [
        ("g0", "t0", "t1"),
        ("g1", "t3", "t1"),
        ("g0", "t2", "t3"),
        ("g1", "t3", "t4"),
        ("g0", "t0", "t4"),
    ]
    judge.choice_probs(pairwise(images, interleaved), PAIR)
    flat = [pair for part in seen for pair in part]
    assert sorted(flat) == sorted((f"{g}.jpg", f"{a}.png") for g, a, _ in interleaved)

    def contiguous(keys: list) -> bool:
        return all(keys.index(k) + keys.count(k) - 1 == len(keys) - 1 - keys[::-1].index(k) for k in keys)

    # A query's comparisons side by side, and within it those that show the same tile first.
    assert contiguous([g for g, _ in flat]) and contiguous(flat)


@pytest.mark.parametrize("penalty", [None, 1.3])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_on_cached_prefixes_is_token_for_token_transformers_generate(
    family, penalty, checkpoints, images
):
    plain = load_judge(family, str(checkpoints[family]), None, device="cpu", batch_size=3, reuse=False)
    reuse = load_judge(family, str(checkpoints[family]), None, device="cpu", batch_size=3, reuse=True)
    for judge in (plain, reuse):
        if penalty:  # Qwen2.5-VL-7B-Instruct's generation config carries one (1.05)
            judge.hf.generation_config.repetition_penalty = penalty
    for reqs in (pointwise(images, "direct", PAIRS[:4]), pairwise(images, TRIPLES[:3])):
        assert reuse.generate(reqs, 10) == plain.generate(reqs, 10)
        # Asked again (the reasoning prompt's second step shares its images), the prefixes and
        # the images' features come from the caches.
        computed, encoded = reuse.counters["level1_rows"], reuse.counters["images_encoded"]
        assert reuse.generate(reqs, 10) == plain.generate(reqs, 10)
        assert reuse.counters["level1_rows"] == computed and reuse.counters["images_encoded"] == encoded
    assert reuse.counters["generated_tokens"] > 0 and reuse.counters["level1_reused"] > 0


def test_qwen_positions_equal_get_rope_index(judges, images):
    judge = judges[("qwen2.5-vl", True)]
    rows = [judge._row(r, PAIR) for r in pairwise(images, TRIPLES[:3])]
    for seq in judge._sequences(rows):
        token_types = (seq.ids == judge.image_token_id).long()
        grid = torch.stack([f.grid_thw for f in seq.feats])
        want, _ = judge.hf.model.get_rope_index(seq.ids[None], token_types[None], image_grid_thw=grid)
        assert torch.equal(seq.pos, want[:, 0])


@pytest.mark.parametrize("family", FAMILIES)
def test_expanded_ids_are_the_processors_ids(family, judges, images):
    judge = judges[(family, True)]
    rows = [judge._row(r, PAIR) for r in pairwise(images, TRIPLES[:3])]
    ours = judge._expanded_ids(rows, judge._features(rows))
    for row, ids in zip(rows, ours, strict=True):
        theirs = judge.processor(
            images=[load_image(p) for p in row.images], text=[row.text], return_tensors="pt"
        )
        assert ids.tolist() == theirs["input_ids"][0].tolist()


def test_batched_window_attention_equals_the_per_window_loop(judges, tmp_path):
    """Images whose windows come in several sizes (edges), as real panoramas and tiles do."""
    from workers.judges import segment_attention

    judge = judges[("qwen2.5-vl", True)]
    rng = np.random.default_rng(5)
    imgs = [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for h, w in [(32, 64), (100, 60), (70, 90)]
    ]
    prepared = [judge.preprocess(im) for im in imgs]
    visual = judge.hf.model.visual
    assert segment_attention.installed(visual)
    batched = judge.encode(prepared)
    segment_attention.uninstall(visual)
    try:
        loop = judge.encode(prepared)
    finally:
        segment_attention.install(visual)
    for a, b in zip(batched, loop, strict=True):
        assert a.embeds.shape == b.embeds.shape and (a.embeds - b.embeds).abs().max().item() < 1e-5


def test_a_batch_out_of_memory_is_split_and_the_size_that_fits_kept(checkpoints, images, caplog):
    judge = load_judge("llava", str(checkpoints["llava"]), None, device="cpu", batch_size=8, reuse=True)
    reference = load_judge("llava", str(checkpoints["llava"]), None, device="cpu", batch_size=8, reuse=False)
    forward = judge._forward

    def small_memory(segments, past, what):
        if len(segments) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(segments, past, what)

    judge._forward = small_memory
    bound = judge.prefixes.max_bytes
    with caplog.at_level("WARNING", logger="workers.judges.hf_vlm"):
        got = judge.choice_probs(pairwise(images, TRIPLES), PAIR)
    assert max_diff(got, reference.choice_probs(pairwise(images, TRIPLES), PAIR), PAIR, log=True) < TOL
    assert judge.batch_cap == 2 and judge.oom_splits >= 2
    assert judge.prefixes.max_bytes < bound  # the cache gave room back
    assert "continuing with 2" in caplog.text
    judge.choice_probs(pairwise(images, TRIPLES), PAIR)  # no new split: batches of 2 from now on
    assert judge.batch_cap == 2

    judge._forward = lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("always"))
    out = judging.run_batch(
        judge, load_prompt("pairwise"), [judging.Item(1, pairwise(images, TRIPLES[:1])[0])]
    )
    assert out[0].status == FAILED and "OutOfMemoryError" in out[0].error  # a single one that never fits
