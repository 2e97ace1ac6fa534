"""A caption job: the request for one slice, its cache key, and the cache row its answer becomes.

``caption_job`` is the only place a cache key is made from a request and the options, and
``cache_row`` the only place a cache row is built, for the sync, batch and offline paths alike.
The key's inputs and their order never change: a cache written by an earlier version must hit.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from captions.answers import Answer, looks_paid, usage_in_body
from captions.cache import cache_key
from captions.cost import CHARS_PER_TOKEN, Estimate, Prices, cost_usd, listed
from captions.offline import OFFLINE_PROMPT_VERSION
from captions.options import CaptionOptions
from captions.prompts import context_fields, prompt_digest, visible_context


@dataclass
class CaptionRequest:
    """One slice to caption. ``context`` holds only coarse, PHI-free fields: modality, plane,
    position (0..1), body_region (str | None), labels_present (list[str]), dataset."""

    slice_id: str
    image_path: Path
    image_sha256: str
    context: dict[str, Any]


@dataclass(frozen=True)
class CacheItem:
    """What a cache row records besides the answer; ``key`` is the content address."""

    key: str
    slice_id: str
    image_sha256: str
    provider: str
    model: str
    prompt_version: str
    params: dict[str, Any]


@dataclass
class Job:
    """One request to answer: its cache item, the request, and (once planned) its estimate."""

    item: CacheItem
    req: CaptionRequest
    estimate: Estimate | None = None

    @property
    def key(self) -> str:
        return self.item.key

    @property
    def version(self) -> str:
        return self.item.prompt_version


def primary_version(options: CaptionOptions) -> str:
    """The prompt version asked first (the fallback prompt is only for re-asks)."""
    return OFFLINE_PROMPT_VERSION if options.offline else options.primary_template.version


def fallback_version(options: CaptionOptions) -> str:
    """The prompt version of --retry-refused re-asks."""
    return options.fallback_template.version


def _params(options: CaptionOptions, context: dict[str, Any], version: str) -> dict[str, Any]:
    # Options added after the first caches enter the key only when not at their defaults, so
    # an older cache still hits.
    if options.offline:
        fields = json.dumps(context_fields(context), sort_keys=True)
        params: dict[str, Any] = {"context_sha256": hashlib.sha256(fields.encode()).hexdigest()}
        # What the offline text also depends on; in the key only when present, so older keys hold.
        extras = {k: context[k] for k in ("label_regions", "channel_name", "foreground_fraction")
                  if context.get(k) is not None}
        if extras:
            params["extras_sha256"] = hashlib.sha256(json.dumps(extras, sort_keys=True).encode()).hexdigest()
        if options.context != "labels":
            params["context"] = options.context  # hidden labels read like absent ones
        return params
    params = {"detail": options.detail, "max_tokens": options.max_tokens, "temperature": options.temperature,
              "prompt_sha256": prompt_digest(context, options.template(version))}
    if options.reasoning_effort is not None:
        params["reasoning_effort"] = options.reasoning_effort
        params["completion_cap"] = options.completion_cap
    if options.image_size is not None:
        params["image_size"] = options.image_size
    return params


def caption_job(options: CaptionOptions, req: CaptionRequest, version: str | None = None) -> Job:
    """The job for one request under ``options`` (prompt ``version``, default the primary one).

    The job's request carries only the context that ``options.context`` lets through.
    """
    version = version or primary_version(options)
    if options.context != "labels":
        req = replace(req, context=visible_context(req.context, options.context))
    params = _params(options, req.context, version)
    key = cache_key(req.image_sha256, options.provider, options.model, version, params)
    return Job(CacheItem(key, req.slice_id, req.image_sha256, options.provider, options.model, version, params), req)


def with_estimated_usage(answer: Answer, input_tokens: int) -> Answer:
    """An answer whose server reported no (or zero) usage, with estimated token counts."""
    if answer.prompt_tokens or answer.completion_tokens:
        return answer
    output = math.ceil(len(answer.text) / CHARS_PER_TOKEN) if answer.text else 0
    return replace(answer, prompt_tokens=input_tokens, completion_tokens=output, usage="estimated")


def answer_usd(item: CacheItem, answer: Answer, mode: str, prices: Prices | None = None,
               any_price: bool = False) -> float | None:
    """What an answer cost: offline is free; estimated usage is priced from ``--prices`` only (a
    server that reports no usage is not OpenAI, whatever the model is called), unless
    ``any_price`` (a broken answer: its usage was lost on the way, not left out by the server)."""
    if mode == "offline":
        return 0.0
    if answer.usage == "estimated" and not any_price and not (prices and listed(item.model, prices)):
        return None
    return cost_usd(item.model, answer.prompt_tokens, answer.completion_tokens, batch=mode == "batch",
                    prices=prices)


def broken_answer(body: bytes | None, input_tokens: int, output_tokens: int) -> Answer | None:
    """The tokens of a 200 whose body was not a usable completion, as an (unusable) Answer:
    read from the body when it still holds them, else the request's estimate when the body
    started as JSON (the model ran), else None (a proxy page: nothing known to be spent)."""
    usage = usage_in_body(body)
    if usage is not None:
        return Answer("", "malformed", True, usage[0], usage[1], None, None)
    if looks_paid(body):
        return Answer("", "malformed", True, input_tokens, output_tokens, None, None, usage="estimated")
    return None


def cache_row(item: CacheItem, answer: Answer, mode: str, request_id: str | None = None,
              prices: Prices | None = None) -> dict[str, Any]:
    """The cache row of one answer (``created_at`` is stamped by the cache when it commits).

    Args:
        item: what was asked.
        answer: the parsed answer (the offline captioner builds one too).
        mode: "sync", "batch" (half price) or "offline" (free).
        request_id: the server's id when it comes apart from the answer (batch output lines).
        prices: ``--prices`` entries (see ``answer_usd``).
    """
    usd = answer_usd(item, answer, mode, prices)
    return {
        "key": item.key, "slice_id": item.slice_id, "image_sha256": item.image_sha256,
        "provider": item.provider, "text": answer.text, "model": answer.model or item.model,
        "prompt_version": item.prompt_version, "params": item.params,
        "finish_reason": answer.finish_reason, "refused": answer.refused,
        "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
        "cost_usd": usd, "request_id": request_id or answer.request_id, "mode": mode,
        "usage": answer.usage,
    }

