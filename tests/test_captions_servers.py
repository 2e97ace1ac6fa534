"""Any model, any server: reasoning models, price tables and --prices, open-model servers (no
usage, their error bodies, context length, no Batch API), x-ratelimit pacing, batch errors and
file clean-up, --prompt-file and --context. All against the local fake server."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest
from caption_driver import make_requests, write_pngs
from fake_openai import TEST_KEY as KEY

from captions import cost
from captions.cache import CaptionCache
from captions.engine import lookup, run_captions
from captions.errors import FatalAPIError
from captions.jobs import CaptionRequest, caption_job
from captions.models import completion_params, is_reasoning_model
from captions.options import CaptionOptions, RetryPolicy
from captions.prompts import load_prompt_file

FAST = RetryPolicy(initial_s=0.01, max_wait_s=0.1)
QWEN = "Qwen/Qwen2.5-VL-7B-Instruct"


def opts(server, **kw) -> CaptionOptions:
    return CaptionOptions(**{"api_key": KEY, "base_url": server.base_url, "concurrency": 4, "retry": FAST,
                             "timeout": 5.0, **kw})


def bodies(server) -> list[dict]:
    return [r for r in server.chat_log()]


# -- reasoning models ---------------------------------------------------------------------------
def test_reasoning_model_gets_low_effort_and_a_cap_sized_for_reasoning(tmp_path, fake_openai):
    requests = make_requests(write_pngs(tmp_path / "png", 6))
    options = opts(fake_openai, model="gpt-5-mini")
    assert options.reasoning_effort == "low" and options.completion_cap > options.max_tokens
    summary = run_captions(requests, options, cache=tmp_path / "c.sqlite")
    # The strict server rejects max_tokens and temperature for gpt-5*: every request was accepted.
    assert (summary.succeeded, summary.truncated, summary.failed) == (6, 0, 0)
    assert {r["reasoning_effort"] for r in fake_openai.chat_log()} == {"low"}
    with CaptionCache(tmp_path / "c.sqlite") as db:
        rows = lookup(requests, options, cache=db)
    # Reasoning tokens are billed as completion tokens: the row's cost covers them.
    assert all(r["completion_tokens"] > 300 and r["text"].startswith("Synthetic") for r in rows.values())
    assert completion_params("gpt-5.2", 2348, 0.0, "low") == {"max_completion_tokens": 2348, "reasoning_effort": "low"}
    assert "temperature" in completion_params("gpt-5-chat-latest", 300, 0.0)
    assert is_reasoning_model("o4-mini-2025-04-16") and not is_reasoning_model("gpt-4o")


def test_empty_length_answers_stop_the_run_with_the_fix(tmp_path, start_fake_openai):
    server = start_fake_openai(reasoning_tokens={"low": 5000})  # more than the cap allows
    requests = make_requests(write_pngs(tmp_path / "png", 20))
    with pytest.raises(FatalAPIError) as info:
        run_captions(requests, opts(server, model="gpt-5-mini", concurrency=1), cache=tmp_path / "c.sqlite")
    message = str(info.value)
    assert "finish_reason=length" in message and "--reasoning-effort" in message and "--max-tokens" in message
    assert "\n" not in message and len(server.chat_log()) == 3  # not one request per slice
    summary = info.value.summary
    assert (summary.truncated, summary.refused, summary.succeeded) == (3, 0, 0)
    # A rerun with a lower effort is a new request (new key) and succeeds.
    server.config.reasoning_tokens = {"low": 5000, "minimal": 0}
    again = run_captions(requests[:3], opts(server, model="gpt-5-mini", reasoning_effort="minimal"),
                         cache=tmp_path / "c.sqlite")
    assert (again.cached, again.succeeded) == (0, 3)


def test_cache_keys_stay_for_defaults_and_change_for_new_options():
    req = CaptionRequest("v:axial:1", __import__("pathlib").Path("x.png"), "ab" * 32,
                         {"modality": "CT", "plane": "axial", "position": 0.5, "labels_present": ["liver"]})
    base = caption_job(CaptionOptions(), req).item
    assert set(base.params) == {"detail", "max_tokens", "temperature", "prompt_sha256"}
    keys = {caption_job(o, req).key for o in (
        CaptionOptions(), CaptionOptions(image_size=256), CaptionOptions(context="metadata"),
        CaptionOptions(reasoning_effort="low"), CaptionOptions(model="gpt-5"),
        CaptionOptions(model="gpt-5", reasoning_effort="medium"))}
    assert len(keys) == 6


# -- prices and model names -------------------------------------------------------------------
def test_price_tables_match_model_families_and_prices_files(tmp_path, caplog):
    assert cost.price_per_million("gpt-5.2") == cost.PRICES["gpt-5.2"]
    assert cost.price_per_million("openai/gpt-5.2-2025-12-11") == cost.PRICES["gpt-5.2"]
    assert cost.price_per_million("gpt-5-mini-2025-08-07") == cost.PRICES["gpt-5-mini"]
    assert cost.price_per_million("gpt-5.9") == cost.PRICES["gpt-5"]  # family, with a warning
    assert "gpt-5.9" in caplog.text and "--prices" in caplog.text
    assert cost.image_tokens("gpt-5.2", 512, 512, "high") == 70 + 140
    assert cost.image_tokens("gpt-5.9-mini", 1024, 1024) == cost.image_tokens("gpt-5-mini", 1024, 1024)
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({QWEN: {"input": 0.2, "output": 0.6, "image_tokens": 300}}))
    prices = cost.load_prices(path)
    assert cost.cost_usd(QWEN, 1_000_000, 1_000_000, prices=prices) == pytest.approx(0.8)
    assert cost.image_tokens(QWEN, 512, 512, prices=prices) == 300
    assert CaptionOptions(model=QWEN, max_usd=1.0, prices=prices).max_usd == 1.0
    for bad, needle in (("{", "not valid JSON"), ('{"m": {"input": 1}}', '"input" and "output"'), ("[]", "expected")):
        path.write_text(bad)
        with pytest.raises(ValueError, match=needle) as info:
            cost.load_prices(path)
        assert str(path) in str(info.value)


# -- open-model servers -------------------------------------------------------------------------
def test_open_server_without_usage_estimates_tokens_and_prices_only_from_file(tmp_path, start_fake_openai):
    server = start_fake_openai(flavor="vllm", usage="none", served_models=[QWEN], batch_api=False)
    requests = make_requests(write_pngs(tmp_path / "png", 4))
    summary = run_captions(requests, opts(server, model=QWEN), cache=tmp_path / "a.sqlite")
    assert summary.succeeded == 4 and summary.usage_estimated == 4
    assert summary.prompt_tokens > 0 and summary.completion_tokens > 0 and summary.usd_actual is None
    prices = {QWEN.lower(): cost.ModelPrice(0.2, 0.6)}
    priced = run_captions(requests, opts(server, model=QWEN, prices=prices), cache=tmp_path / "b.sqlite")
    assert priced.usd_actual is not None and priced.usd_actual > 0
    with CaptionCache(tmp_path / "b.sqlite") as db:
        assert {r["usage"] for r in db.rows()} == {"estimated"}


@pytest.mark.parametrize("flavor,needle", [("vllm", "The model `llava` does not exist"),
                                           ("ollama", 'model "llava" not found'),
                                           ("fastapi", "The model `llava` does not exist")])
def test_open_server_errors_become_one_clear_line(tmp_path, start_fake_openai, flavor, needle):
    server = start_fake_openai(flavor=flavor, served_models=[QWEN])
    requests = make_requests(write_pngs(tmp_path / "png", 3))
    with pytest.raises(FatalAPIError) as info:
        run_captions(requests, opts(server, model="llava"), cache=tmp_path / "c.sqlite")
    message = str(info.value)
    assert needle in message and "404" in message and "--model" in message and "\n" not in message


def test_context_length_400_is_explained_and_image_size_fixes_it(tmp_path, start_fake_openai):
    server = start_fake_openai(flavor="vllm", context_length=700)
    png = write_pngs(tmp_path / "png", 1)
    from PIL import Image

    Image.new("L", (512, 512), 9).save(png / "img000.png")  # 19*19 = 361 patches + 300 completion
    requests = make_requests(png)
    with pytest.raises(FatalAPIError) as info:
        run_captions(requests, opts(server, model=QWEN), cache=tmp_path / "c.sqlite")
    assert "maximum context length is 700" in str(info.value) and "--image-size" in str(info.value)
    summary = run_captions(requests, opts(server, model=QWEN, image_size=128), cache=tmp_path / "c.sqlite")
    assert summary.succeeded == 1 and server.chat_log()[-1]["image_size"] == [128, 128]


def test_batch_mode_on_a_server_without_batch_api_says_so(tmp_path, start_fake_openai):
    server = start_fake_openai(flavor="vllm", batch_api=False)
    requests = make_requests(write_pngs(tmp_path / "png", 3))
    with pytest.raises(FatalAPIError) as info:
        run_captions(requests, opts(server, model=QWEN, mode="batch", poll_interval=0.05),
                     cache=tmp_path / "c.sqlite", batch_dir=tmp_path / "b")
    message = str(info.value)
    assert "has no Batch API" in message and "--mode sync" in message and "check --model" not in message


# -- pacing from headers ------------------------------------------------------------------------
def test_ratelimit_headers_pace_the_run_when_no_rpm_is_given(tmp_path, start_fake_openai):
    # 8 requests per 1 s window (the headers say 480/min); 40 requests at concurrency 8. Without
    # pacing the client hammers the limit (dozens of 429s); with it only a few slip through, more
    # on a loaded machine, where replies and waits stretch (so the bound is loose, not exact).
    server = start_fake_openai(rpm_limit=8, rate_window=1.0, retry_after=0.05)
    requests = make_requests(write_pngs(tmp_path / "png", 40))
    summary = run_captions(requests, opts(server, concurrency=8), cache=tmp_path / "c.sqlite")
    statuses = Counter(r["status"] for r in server.chat_log())
    assert summary.succeeded == 40 and statuses[429] <= 10, statuses


# -- batch: errors, re-queue, clean-up, no list ---------------------------------------------------
def test_batch_token_limit_cuts_files_and_keeps_the_queue_within_it(tmp_path, start_fake_openai):
    from captions.budget import Budget
    from captions.plan import estimate, plan

    server = start_fake_openai(batch_delay=0.2)
    requests = make_requests(write_pngs(tmp_path / "png", 6))
    probe = opts(server, mode="batch")
    with CaptionCache(tmp_path / "probe.sqlite") as db:
        jobs, _ = plan(probe, requests, db, Budget.of(probe), set())
    per_request = max(estimate(probe, j).input_tokens for j in jobs)
    limit = 2 * per_request + per_request // 2  # two requests fit, three do not
    # --no-wait: the first run submits what fits; the rest waits, prepared, for later runs
    first = run_captions(requests, opts(server, mode="batch", poll_interval=0.02, batch_wait=False,
                                        batch_token_limit=limit),
                         cache=tmp_path / "c.sqlite", batch_dir=tmp_path / "b")
    assert first.sent == 2 and first.pending >= 4  # one file of two; 6 unless it already finished
    # waiting: each batch is submitted once the queue has room, and all six are answered
    done = run_captions(requests, opts(server, mode="batch", poll_interval=0.02, batch_token_limit=limit),
                        cache=tmp_path / "c.sqlite", batch_dir=tmp_path / "b")
    assert done.pending == 0 and first.succeeded + done.succeeded == 6
    assert server.calls("POST", "/v1/batches") == 3
    assert server.enqueued_at_create == [0, 0, 0]  # never two unfinished batches over the limit


def test_batch_errors_line_requeue_and_uploaded_files_deleted(tmp_path, start_fake_openai):
    server = start_fake_openai(batch_delay=0.05, batch_fail="token_limit_exceeded", batch_list=False)
    requests = make_requests(write_pngs(tmp_path / "png", 5))
    options = opts(server, mode="batch", poll_interval=0.02)
    first = run_captions(requests, options, cache=tmp_path / "c.sqlite", batch_dir=tmp_path / "b")
    assert first.succeeded == 0 and first.failed == 5
    assert any("token_limit_exceeded" in e and "Enqueued token limit" in e for e in first.errors)
    second = run_captions(requests, options, cache=tmp_path / "c.sqlite", batch_dir=tmp_path / "b")
    assert (second.sent, second.succeeded) == (5, 5)  # the failed requests were planned again
    assert server.files == {}  # inputs, outputs and error files deleted once ingested
    assert server.calls("POST", "/v1/batches") == 2


# -- prompts and context --------------------------------------------------------------------------
def test_prompt_file_and_context_levels(tmp_path, fake_openai):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("You caption scans tersely.\n---\nOne sentence about this {plane} {modality} slice.")
    template = load_prompt_file(prompt, "metadata")
    assert template.version.startswith("file-") and template.system == "You caption scans tersely."
    requests = make_requests(write_pngs(tmp_path / "png", 4))
    run_captions(requests, opts(fake_openai, prompt=template, context="metadata"), cache=tmp_path / "c.sqlite")
    texts = [r["text"] for r in fake_openai.chat_log()]
    assert all("tersely" in t and "One sentence about this" in t for t in texts)
    with CaptionCache(tmp_path / "c.sqlite") as db:
        assert {r["prompt_version"] for r in db.rows()} == {template.version}
    run_captions(requests, opts(fake_openai, context="metadata"), cache=tmp_path / "m.sqlite")
    run_captions(requests, opts(fake_openai, context="none"), cache=tmp_path / "n.sqlite")
    meta, none = [r["text"] for r in fake_openai.chat_log()[4:8]], [r["text"] for r in fake_openai.chat_log()[8:]]
    assert not any("liver" in t or "annotated" in t for t in meta) and all("axial" in t or "coronal" in t
                                                                          or "sagittal" in t for t in meta)
    assert not any("CT" in t.split("\n", 1)[1] for t in none)  # the image alone
    offline = CaptionOptions(provider="offline", context="metadata")
    run_captions(requests, offline, cache=tmp_path / "o.sqlite")
    with CaptionCache(tmp_path / "o.sqlite") as db:
        assert not any("liver" in r["text"] for r in lookup(requests, offline, cache=db).values())
    prompt.write_text("Describe {structures} here.")
    with pytest.raises(ValueError, match="--context metadata leaves out") as info:
        load_prompt_file(prompt, "metadata")
    assert str(prompt) in str(info.value)
    prompt.write_text("Describe {organ}.")
    with pytest.raises(ValueError, match="unknown placeholder"):
        load_prompt_file(prompt)
    with pytest.raises(ValueError, match="offline"):
        CaptionOptions(provider="offline", context="none")


def test_image_size_resizes_client_side(tmp_path, fake_openai):
    from PIL import Image

    png = write_pngs(tmp_path / "png", 1)
    Image.new("L", (512, 256), 9).save(png / "img000.png")
    requests = make_requests(png)
    run_captions(requests, opts(fake_openai, image_size=64), cache=tmp_path / "c.sqlite")
    assert fake_openai.chat_log()[-1]["image_size"] == [64, 32]
    plan = run_captions(requests, replace(opts(fake_openai), dry_run=True), cache=tmp_path / "c.sqlite")
    assert plan.to_send == 1  # the full-size request is another key
