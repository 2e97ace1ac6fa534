"""Captioning units: prompts, cache, cost rules, retry hints, refusals, offline captioner,
options, budget, cache keys and rows."""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import types
from dataclasses import replace
from pathlib import Path

import pytest
from caption_driver import make_requests, write_pngs
from PIL import Image

from captions import cost
from captions.budget import Budget
from captions.cache import COLUMNS, CaptionCache, cache_key
from captions.client import Answer, detect_refusal, redact, retry_after_hint
from captions.engine import lookup, run_captions
from captions.errors import FatalAPIError
from captions.jobs import CaptionRequest, cache_row, caption_job
from captions.offline import offline_caption
from captions.options import CaptionOptions
from captions.prompts import FALLBACK_PROMPT_VERSION, PROMPT_VERSION, build_messages, position_word, prompt_digest

OFFLINE = CaptionOptions(provider="offline")

CTX = {"modality": "CT", "plane": "axial", "position": 0.8, "body_region": "abdomen",
       "labels_present": ["liver", "right_kidney", "background"], "dataset": "3dseg8"}


def test_messages_carry_pixels_and_coarse_context_only(tmp_path):
    png = tmp_path / "patient_john_doe_123.png"
    Image.new("L", (8, 8), 7).save(png)
    req = CaptionRequest("MRN123456:axial:40", png, "ab" * 32, CTX)
    messages = build_messages(req, png.read_bytes(), "high")
    text = json.dumps(messages)
    assert "MRN123456" not in text and "john_doe" not in text and str(tmp_path) not in text
    assert "3dseg8" not in text  # dataset name is metadata, not image content
    image = messages[1]["content"][1]["image_url"]
    assert image["url"].startswith("data:image/png;base64,") and image["detail"] == "high"
    user = messages[1]["content"][0]["text"]
    assert "upper" in user and "liver, right kidney" in user and "background" not in user
    assert messages[0]["role"] == "system" and messages[0]["content"]


def test_prompt_versions_and_digests_differ():
    assert PROMPT_VERSION != FALLBACK_PROMPT_VERSION
    assert prompt_digest(CTX) != prompt_digest(CTX, FALLBACK_PROMPT_VERSION)
    # Fine position changes inside one coarse level do not change what is asked.
    assert prompt_digest({**CTX, "position": 0.80}) == prompt_digest({**CTX, "position": 0.95})
    assert prompt_digest({**CTX, "position": 0.5}) != prompt_digest(CTX)
    assert position_word("sagittal", 0.1) == "left" and position_word("coronal", 0.9) == "anterior"


def test_cache_key_covers_every_component():
    base = ("a" * 64, "openai", "gpt-4o", "v1", {"detail": "low", "max_tokens": 300})
    key = cache_key(*base)
    assert key == cache_key(*base[:4], {"max_tokens": 300, "detail": "low"})  # order-free params
    variants = [("b" * 64, *base[1:]), (base[0], "other", *base[2:]), (*base[:2], "gpt-4.1", *base[3:]),
                (*base[:3], "v2", base[4]), (*base[:4], {"detail": "high", "max_tokens": 300})]
    assert len({key, *(cache_key(*v) for v in variants)}) == 6


def test_cache_is_wal_full_sync_durable_and_first_answer_wins(tmp_path):
    path = tmp_path / "cache" / "captions.sqlite"
    with CaptionCache(path) as cache:
        assert cache.put({"key": "k1", "slice_id": "s1", "text": "first", "refused": False, "mode": "sync"})
        assert not cache.put({"key": "k1", "slice_id": "s1", "text": "second", "mode": "sync"})
        assert cache.put_many([{"key": f"k{i}", "text": str(i), "mode": "offline"} for i in range(2, 5)]) == 3
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    with CaptionCache(path) as cache:
        assert cache._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert cache.get("k1")["text"] == "first" and len(cache) == 4
        assert cache.cached_keys(["k1", "k9", "k3"]) == {"k1", "k3"}
        df = cache.to_dataframe()
    assert {"key", "slice_id", "text", "model", "prompt_version", "finish_reason", "refused",
            "prompt_tokens", "completion_tokens", "cost_usd", "request_id", "mode",
            "created_at"} <= set(df.columns)
    assert df["refused"].dtype == bool


def test_image_token_rules():
    # OpenAI's worked examples for the 512-px tile rule.
    assert cost.image_tokens("gpt-4o", 1024, 1024, "high") == 765
    assert cost.image_tokens("gpt-4o-2024-08-06", 2048, 4096, "high") == 1105
    assert cost.image_tokens("gpt-4-vision-preview", 4096, 8192, "low") == 85
    assert cost.image_tokens("gpt-4.1", 512, 512, "high") == 255  # small images are not upscaled
    assert cost.image_tokens("gpt-4o-mini", 1024, 1024, "low") == 2833
    assert cost.image_tokens("gpt-4o-mini-2024-07-18", 1024, 1024, "high") == 2833 + 4 * 5667
    # 32-px patch rule: 1024x1024 = 1024 patches; 1800x2400 is capped to 1452 patches.
    assert cost.image_tokens("gpt-4.1-mini", 1024, 1024) == 1659
    assert cost.image_tokens("gpt-4.1-mini-2025-04-14", 1800, 2400) == 2353
    assert cost.image_tokens("o4-mini", 1024, 1024) == 1762


def test_prices_batch_discount_and_unknown_models(caplog):
    assert cost.cost_usd("gpt-4o", 1_000_000, 0) == pytest.approx(2.5)
    assert cost.cost_usd("gpt-4o-2024-05-13", 0, 1_000_000) == pytest.approx(15.0)
    assert cost.cost_usd("gpt-4o-mini", 1_000_000, 1_000_000, batch=True) == pytest.approx(0.375)
    with caplog.at_level(logging.WARNING):
        assert cost.cost_usd("llava-next-local", 1000, 1000) is None
        assert cost.image_tokens("llava-next-local", 1024, 1024, "high") == 765
    assert "llava-next-local" in caplog.text
    est = cost.estimate_request("gpt-4o", text_chars=400, width=512, height=512, detail="low", max_tokens=300)
    assert est.input_tokens == 100 + 11 + 85 and est.output_tokens == 300
    assert est.usd == pytest.approx((196 * 2.5 + 300 * 10) / 1e6)


def _status_error(headers: dict[str, str], message: str = "rate limited"):
    return types.SimpleNamespace(response=types.SimpleNamespace(headers=headers), message=message)


def test_retry_after_hints():
    assert retry_after_hint(_status_error({"retry-after-ms": "250"})) == pytest.approx(0.25)
    assert retry_after_hint(_status_error({"retry-after": "2"})) == pytest.approx(2.0)
    assert retry_after_hint(_status_error({}, "Limit 3. Please try again in 1.5s. Visit x")) == 1.5
    assert retry_after_hint(_status_error({}, "try again in 20ms")) == pytest.approx(0.02)
    assert retry_after_hint(_status_error({}, "Please try again in 6m0s.")) == 360.0
    assert retry_after_hint(_status_error({}, "server error")) is None
    assert retry_after_hint(ValueError("boom")) is None


def test_refusal_detection():
    assert detect_refusal("I'm sorry, but I can't help with that.", "stop")
    assert detect_refusal("I\u2019m unable to provide a diagnosis.", "stop")
    assert detect_refusal("", "stop") and detect_refusal("   ", "stop")
    assert detect_refusal("Axial CT of the", "length")
    assert detect_refusal("ok", "content_filter")
    assert detect_refusal("", "stop", refusal="I can't assist with that.")
    assert not detect_refusal("Axial CT slice at the level of the liver and spleen.", "stop")


def test_redact_removes_keys():
    text = redact("Incorrect API key provided: sk-test-SECRET123.\nAuthorization: Bearer abc", "sk-test-SECRET123")
    assert "SECRET123" not in text and "abc" not in text and "\n" not in text


def test_offline_captions_are_grounded_and_deterministic(tmp_path):
    text = offline_caption(CTX)
    assert text == offline_caption(dict(CTX))
    assert "axial" in text.lower() and "CT" in text and "abdomen" in text and "superior" in text
    assert "the liver and the right kidney" in text and "background" not in text
    unlabelled = offline_caption({"modality": "MR", "plane": "sagittal", "position": 0.5,
                                  "body_region": None, "labels_present": []})
    assert "sagittal" in unlabelled.lower() and "MRI" in unlabelled
    # no claims about structures in a volume without a label map
    assert "annotated" not in unlabelled and "label" not in unlabelled.lower()


def test_offline_run_writes_cache_and_rerun_is_cached(tmp_path):
    requests = make_requests(write_pngs(tmp_path / "png", 12))
    cache = tmp_path / "captions.sqlite"
    first = run_captions(requests, replace(OFFLINE, budget=10), cache=cache)
    assert (first.sent, first.succeeded, first.over_budget, first.usd_actual) == (10, 10, 2, 0.0)
    second = run_captions(requests, OFFLINE, cache=cache)
    assert (second.cached, second.sent) == (10, 2)
    with CaptionCache(cache) as db:
        rows = lookup(requests, OFFLINE, cache=db)
        assert set(rows) == {r.slice_id for r in requests}
        assert {r["mode"] for r in rows.values()} == {"offline"}
        assert all(r["cost_usd"] == 0.0 and not r["refused"] for r in rows.values())
        req = requests[3]
        assert rows[req.slice_id]["text"] == offline_caption(req.context)


def test_duplicate_images_are_asked_once(tmp_path):
    png = write_pngs(tmp_path / "png", 1) / "img000.png"
    sha = hashlib.sha256(png.read_bytes()).hexdigest()
    requests = [CaptionRequest(f"v{i}:axial:0", png, sha, CTX) for i in range(3)]
    summary = run_captions(requests, OFFLINE, cache=tmp_path / "c.sqlite")
    assert (summary.sent, summary.duplicates) == (1, 2)
    with CaptionCache(tmp_path / "c.sqlite") as db:
        assert len(lookup(requests, OFFLINE, cache=db)) == 3


def test_cache_keys_are_those_of_earlier_versions():
    """Keys written by earlier versions must still hit: pinned, for each provider and prompt."""
    req = CaptionRequest("v:axial:40", Path("x.png"), "ab" * 32, CTX)
    pinned = [
        (CaptionOptions(), ("ffda63526e05579740d8511d0bc3d8ac202611c41b1dc3ad3bc814ce1a4a48e1",
                            "4a4459882b5034090346012eb91cf85055a567bcb72466f44d9683590634ec72")),
        (CaptionOptions(model="gpt-4.1-mini", detail="high", mode="batch"), (
            "6785979290d99528e0331fc1974e72ca2518cc52460aa8b40c0a366d01eaab5d",
            "54df2be7edb1e4939d7812feae7e1fd874fcd11c8fa09be1bd5507723c225693")),
        # offline-v2 (grounded captions): a new primary key on purpose, so v1 text is not reused
        (OFFLINE, ("8f0b1ef99e09b44f6e379e3f48a72b7f668bfcf243a688c8c92c847530630535",
                   "29cd2a3a74e303cf5c9a8ec72c5cf03e5b9998acb19eaa66a92997845646af92")),
    ]
    for options, (primary, fallback) in pinned:
        assert caption_job(options, req).key == primary
        assert caption_job(options, req, FALLBACK_PROMPT_VERSION).key == fallback


def test_options_resolve_validate_and_hide_the_key():
    assert (OFFLINE.model, OFFLINE.mode) == ("template", "offline")
    assert replace(OFFLINE, mode="batch").mode == "offline"  # the offline captioner never batches
    assert CaptionOptions().model == cost.DEFAULT_MODEL and CaptionOptions(concurrency=0).concurrency == 1
    key = CaptionOptions(api_key="sk-test-SECRET123")
    assert "SECRET123" not in repr(key) + str(key) and key.request_key() == "sk-test-SECRET123"
    assert CaptionOptions(base_url="http://127.0.0.1:1/v1").request_key() == "not-needed"
    with pytest.raises(FatalAPIError, match="OPENAI_API_KEY"):
        CaptionOptions().request_key()
    for bad in (dict(provider="anthropic"), dict(mode="stream"), dict(detail="medium"),
                dict(model="llava-local", max_usd=1.0)):
        with pytest.raises(ValueError):
            CaptionOptions(**bad)


def test_budget_is_the_first_n_slices_cached_or_not_and_never_skips_ahead():
    budget = Budget(limit=3)
    # Cached (free) slices count toward N too: the release is the first N slices, whatever is cached.
    assert [budget.take(free=f) for f in (True, False, True, False, True)] == [True] * 3 + [False, False]
    assert budget.used == 3 and budget.full and budget.left == 0 and not budget.room(free=True)
    assert Budget().take() and Budget().left is None and Budget(limit=0).full
    usd = Budget(max_usd=1.0)
    assert usd.take(usd=0.6) and not usd.take(usd=0.5) and "--max-usd 1" in usd.stopped
    assert not usd.take(usd=0.1)  # a cheaper request never jumps the queue
    assert usd.take(free=True) and usd.planned_usd == pytest.approx(0.6)  # a cached slice costs nothing
    live = Budget(max_usd=1.0)  # at send time: reported spend + in flight + this one
    live.reserve(0.5)
    assert live.may_send(0.5) and not live.may_send(0.6)
    live.release(0.5)
    live.spend(0.7)
    assert not live.may_send(0.4) and live.may_send(0.3) and live.may_send(None)


def test_one_cache_row_builder_for_sync_batch_and_offline():
    req = CaptionRequest("v:axial:1", Path("x.png"), "cd" * 32, CTX)
    answer = Answer("Axial CT.", "stop", False, 1000, 100, "req_1", None)
    item = caption_job(CaptionOptions(), req).item
    sync, batch = cache_row(item, answer, "sync"), cache_row(item, answer, "batch", "req_batch")
    assert set(sync) == set(COLUMNS) - {"created_at"}
    assert sync["cost_usd"] == pytest.approx(cost.cost_usd("gpt-4o", 1000, 100)) == 2 * batch["cost_usd"]
    assert (sync["request_id"], batch["request_id"], sync["model"]) == ("req_1", "req_batch", "gpt-4o")
    assert sync["key"] == item.key and sync["params"] == item.params and sync["prompt_version"] == PROMPT_VERSION
    free = cache_row(caption_job(OFFLINE, req).item, Answer("t", "stop", False, 0, 0, None, None), "offline")
    assert (free["cost_usd"], free["model"], free["mode"]) == (0.0, "template", "offline")
