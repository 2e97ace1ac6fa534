"""What a model name tells the request: reasoning or not, and how many completion tokens to allow.

Reasoning models (o1/o3/o4..., gpt-5 and its point releases, but not the "-chat" variants) take
``max_completion_tokens`` (not ``max_tokens``), only the default temperature, and a
``reasoning_effort``. Their reasoning tokens come out of the completion cap: a cap sized for
the caption alone comes back empty with finish_reason "length". So the cap is the caption's
``max_tokens`` plus an allowance for the effort, and a low effort is the default for captions.
"""

from __future__ import annotations

import re
from typing import Any

REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
DEFAULT_REASONING_EFFORT = "low"  # a caption needs little reasoning; more costs more and is slower
# Completion tokens reserved for reasoning on top of the caption, per effort.
REASONING_ALLOWANCE: dict[str, int] = {
    "none": 0, "minimal": 512, "low": 2048, "medium": 8192, "high": 24576, "xhigh": 32768,
}


def is_reasoning_model(model: str) -> bool:
    """o-series and gpt-5* (point releases included), except the non-reasoning chat variants."""
    name = model.rsplit("/", 1)[-1].lower()
    return bool(re.match(r"^(o\d|gpt-5)", name)) and "-chat" not in name


def completion_cap(model: str, max_tokens: int, effort: str | None) -> int:
    """Completion tokens to allow: the caption's ``max_tokens`` plus, for a reasoning model, the
    allowance of its ``effort``."""
    if not is_reasoning_model(model):
        return max_tokens
    return max_tokens + REASONING_ALLOWANCE.get(effort or "medium", REASONING_ALLOWANCE["medium"])


def completion_params(model: str, cap: int, temperature: float, effort: str | None = None) -> dict[str, Any]:
    """Generation kwargs of a chat request.

    Args:
        model: the model asked.
        cap: completion tokens (``completion_cap``).
        temperature: sent to non-reasoning models only (reasoning models reject non-defaults).
        effort: ``reasoning_effort``; sent when set (open servers running a reasoning model,
            e.g. gpt-oss on vLLM, take it too).
    """
    if is_reasoning_model(model):
        params: dict[str, Any] = {"max_completion_tokens": cap}
    else:
        params = {"max_tokens": cap, "temperature": temperature}
    if effort is not None:
        params["reasoning_effort"] = effort
    return params
