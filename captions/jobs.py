"""A caption job: the request for one slice, its cache key, and the cache row its answer becomes.

``caption_job`` is the only place a cache key is made from a request and the options, and
``cache_row`` the only place a cache row is built, for the sync, batch and offline paths alike.
The key's inputs and their order never change: a cache written by an earlier version must hit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captions.cache import cache_key
from captions.client import Answer
from captions.cost import Estimate, cost_usd
from captions.offline import OFFLINE_PROMPT_VERSION
from captions.options import CaptionOptions
from captions.prompts import PROMPT_VERSION, context_fields, prompt_digest


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
    return OFFLINE_PROMPT_VERSION if options.offline else PROMPT_VERSION


def _params(options: CaptionOptions, context: dict[str, Any], version: str) -> dict[str, Any]:
    if options.offline:
        fields = json.dumps(context_fields(context), sort_keys=True)
        return {"context_sha256": hashlib.sha256(fields.encode()).hexdigest()}
    return {"detail": options.detail, "max_tokens": options.max_tokens, "temperature": options.temperature,
            "prompt_sha256": prompt_digest(context, version)}


def caption_job(options: CaptionOptions, req: CaptionRequest, version: str | None = None) -> Job:
    """The job for one request under ``options`` (prompt ``version``, default the primary one)."""
    version = version or primary_version(options)
    params = _params(options, req.context, version)
    key = cache_key(req.image_sha256, options.provider, options.model, version, params)
    return Job(CacheItem(key, req.slice_id, req.image_sha256, options.provider, options.model, version, params), req)


def cache_row(item: CacheItem, answer: Answer, mode: str, request_id: str | None = None) -> dict[str, Any]:
    """The cache row of one answer (``created_at`` is stamped by the cache when it commits).

    Args:
        item: what was asked.
        answer: the parsed answer (the offline captioner builds one too).
        mode: "sync", "batch" (half price) or "offline" (free).
        request_id: the server's id when it comes apart from the answer (batch output lines).
    """
    if mode == "offline":
        usd: float | None = 0.0
    else:
        usd = cost_usd(item.model, answer.prompt_tokens, answer.completion_tokens, batch=mode == "batch")
    return {
        "key": item.key, "slice_id": item.slice_id, "image_sha256": item.image_sha256,
        "provider": item.provider, "text": answer.text, "model": answer.model or item.model,
        "prompt_version": item.prompt_version, "params": item.params,
        "finish_reason": answer.finish_reason, "refused": answer.refused,
        "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
        "cost_usd": usd, "request_id": request_id or answer.request_id, "mode": mode,
    }
