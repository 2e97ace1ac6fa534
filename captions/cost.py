"""Token and USD estimates for vision chat requests.

Image tokens follow OpenAI's published rules: a 512-px tile rule (gpt-4o, gpt-4.1,
gpt-4-turbo, GPT-4V, with model-specific base/tile costs) and a 32-px patch rule with a
multiplier (gpt-4.1-mini/nano, o4-mini, gpt-5-mini/nano). Prices are USD per 1M tokens as
published when this table was written; the Batch API costs half. Unknown models (e.g. a local
vLLM model) get the gpt-4o tile rule and no price, with one warning.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt-4o"
CHARS_PER_TOKEN = 4.0
TOKENS_PER_MESSAGE = 4  # role and separators, per chat message
TOKENS_REPLY_PRIMING = 3
BATCH_DISCOUNT = 0.5

# model prefix -> (base tokens, tokens per 512-px tile)
TILE_RULES: dict[str, tuple[int, int]] = {
    "gpt-4o": (85, 170),
    "chatgpt-4o-latest": (85, 170),
    "gpt-4o-mini": (2833, 5667),
    "gpt-4.1": (85, 170),
    "gpt-4.5-preview": (85, 170),
    "gpt-4-turbo": (85, 170),
    "gpt-4-vision-preview": (85, 170),
    "gpt-4-1106-vision-preview": (85, 170),
    "o1": (75, 150),
    "o3": (75, 150),
    "gpt-5": (70, 140),
}
# model prefix -> multiplier on the number of 32-px patches (at most 1536 patches)
PATCH_RULES: dict[str, float] = {
    "gpt-4.1-mini": 1.62,
    "gpt-4.1-nano": 2.46,
    "o4-mini": 1.72,
    "gpt-5-mini": 1.62,
    "gpt-5-nano": 2.46,
}
# model prefix -> (USD per 1M input tokens, USD per 1M output tokens), standard tier
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-2024-05-13": (5.00, 15.00),
    "chatgpt-4o-latest": (5.00, 15.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.5-preview": (75.00, 150.00),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4-vision-preview": (10.00, 30.00),
    "gpt-4-1106-vision-preview": (10.00, 30.00),
    "o1": (15.00, 60.00),
    "o3": (2.00, 8.00),
    "o4-mini": (1.10, 4.40),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
}


@dataclass(frozen=True)
class Estimate:
    """Estimated tokens and cost of one request; ``usd`` is None for unpriced models."""

    input_tokens: int
    output_tokens: int
    usd: float | None


def _match(model: str, table: dict) -> str | None:
    """Longest table key equal to the model or a dash-separated prefix of it."""
    name = model.rsplit("/", 1)[-1].lower()
    hits = [k for k in table if name == k or name.startswith(k + "-")]
    return max(hits, key=len) if hits else None


@functools.lru_cache(maxsize=None)
def _warn_once(model: str, what: str) -> None:
    log.warning("unknown model %r: %s", model, what)


def _tile_tokens(width: int, height: int, detail: str, base: int, per_tile: int) -> int:
    if detail == "low":
        return base
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        s = 2048 / max(w, h)
        w, h = w * s, h * s
    if min(w, h) > 768:
        s = 768 / min(w, h)
        w, h = w * s, h * s
    tiles = math.ceil(w / 512 - 1e-9) * math.ceil(h / 512 - 1e-9)
    return base + per_tile * tiles


def _patches(width: int, height: int, max_patches: int = 1536) -> int:
    def cover(w: float, h: float) -> int:
        return math.ceil(w / 32 - 1e-9) * math.ceil(h / 32 - 1e-9)

    n = cover(width, height)
    if n <= max_patches:
        return n
    r = math.sqrt(32 * 32 * max_patches / (width * height))
    rw, rh = width * r, height * r
    r *= min(math.floor(rw / 32) / (rw / 32), math.floor(rh / 32) / (rh / 32))
    return cover(width * r, height * r)


def image_tokens(model: str, width: int, height: int, detail: str = "low") -> int:
    """Input tokens one image costs for ``model`` at ``detail`` ("low", "high", "auto")."""
    patch = _match(model, PATCH_RULES)
    tile = _match(model, TILE_RULES)
    if patch and (tile is None or len(patch) >= len(tile)):
        return math.ceil(_patches(width, height) * PATCH_RULES[patch])
    if tile is None:
        _warn_once(model, "image tokens estimated with the gpt-4o tile rule")
        base, per_tile = TILE_RULES[DEFAULT_MODEL]
    else:
        base, per_tile = TILE_RULES[tile]
    return _tile_tokens(width, height, detail, base, per_tile)


def price_per_million(model: str) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens, or None (with one warning) when unknown."""
    key = _match(model, PRICES)
    if key is None:
        _warn_once(model, "no price known; USD estimates are unavailable")
        return None
    return PRICES[key]


def cost_usd(
    model: str, prompt_tokens: int, completion_tokens: int, *, batch: bool = False
) -> float | None:
    """USD for a request's token counts, or None for an unpriced model."""
    price = price_per_million(model)
    if price is None:
        return None
    usd = (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6
    return usd * BATCH_DISCOUNT if batch else usd


def text_tokens(chars: int, n_messages: int = 2) -> int:
    """Rough prompt-text tokens: ~4 characters per token plus chat framing."""
    return math.ceil(chars / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * n_messages + TOKENS_REPLY_PRIMING


def estimate_request(
    model: str,
    *,
    text_chars: int,
    width: int,
    height: int,
    detail: str,
    max_tokens: int,
    batch: bool = False,
) -> Estimate:
    """Estimate one caption request; output is assumed to use all of ``max_tokens``."""
    input_tokens = text_tokens(text_chars) + image_tokens(model, width, height, detail)
    return Estimate(input_tokens, max_tokens, cost_usd(model, input_tokens, max_tokens, batch=batch))


def png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image, read from its header only."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size
