"""Token and USD estimates for vision chat requests.

Image tokens follow OpenAI's published rules: a 512-px tile rule (gpt-4o, gpt-4.1, gpt-5,
gpt-4-turbo, GPT-4V, with model-specific base/tile costs) and a 32-px patch rule with a
multiplier (gpt-4.1-mini/nano, o4-mini, gpt-5-mini/nano). Prices are USD per 1M tokens as
published on ``PRICES_AS_OF``; the Batch API costs half.

A model name matches a table key when it equals it or extends it with "-..." (a snapshot date,
"-latest"); the longest key wins, so "gpt-5-mini-2025-08-07" is gpt-5-mini, not gpt-5. A point
release without its own entry falls back to its family ("gpt-5.3" -> "gpt-5", "gpt-5.3-mini" ->
"gpt-5-mini"): exact for image tokens, and priced with one warning. A provider prefix
("openai/gpt-4o") is ignored. ``--prices FILE`` (``load_prices``) adds or overrides entries, for
models the table lacks (local servers included); they are matched the same way. Unknown models
(e.g. a local vLLM model) get the gpt-4o tile rule and no price, with one warning.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping
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
    "gpt-5-chat-latest": (70, 140),
}
# model prefix -> multiplier on the number of 32-px patches (at most 1536 patches)
PATCH_RULES: dict[str, float] = {
    "gpt-4.1-mini": 1.62,
    "gpt-4.1-nano": 2.46,
    "o4-mini": 1.72,
    "gpt-5-mini": 1.62,
    "gpt-5-nano": 2.46,
}
PRICES_AS_OF = "2025-12"
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
    "o1-pro": (150.00, 600.00),
    "o3": (2.00, 8.00),
    "o3-pro": (20.00, 80.00),
    "o4-mini": (1.10, 4.40),
    "gpt-5": (1.25, 10.00),
    "gpt-5-chat-latest": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-5-pro": (15.00, 120.00),
    "gpt-5.1": (1.25, 10.00),
    "gpt-5.1-chat-latest": (1.25, 10.00),
    "gpt-5.2": (1.75, 14.00),
    "gpt-5.2-chat-latest": (1.75, 14.00),
    "gpt-5.2-pro": (21.00, 168.00),
}


@dataclass(frozen=True)
class ModelPrice:
    """One ``--prices`` entry: USD per 1M tokens, and optionally the tokens one image costs."""

    input: float
    output: float
    image_tokens: int | None = None


Prices = Mapping[str, ModelPrice]


def load_prices(path: str | Path) -> dict[str, ModelPrice]:
    """Read a ``--prices`` JSON file: ``{"model": {"input": 0.2, "output": 0.6, "image_tokens": 256}}``
    (USD per 1M tokens; ``image_tokens`` optional, for servers with their own image rule).

    Raises:
        ValueError: one line naming the file and what is wrong in it.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the prices file: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f'{path}: expected an object like {{"my-model": {{"input": 0.2, "output": 0.6}}}}')
    out: dict[str, ModelPrice] = {}
    for model, entry in data.items():
        fields = entry if isinstance(entry, dict) else {}
        try:
            price = ModelPrice(float(fields["input"]), float(fields["output"]),
                               None if fields.get("image_tokens") is None else int(fields["image_tokens"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f'{path}: model {model!r} needs numbers "input" and "output" (USD per 1M tokens)'
                             ) from None
        if min(price.input, price.output) < 0 or (price.image_tokens or 0) < 0:
            raise ValueError(f"{path}: model {model!r} has a negative price or token count")
        out[str(model).lower()] = price
    return out


@dataclass(frozen=True)
class Estimate:
    """Estimated tokens and cost of one request; ``usd`` is None for unpriced models."""

    input_tokens: int
    output_tokens: int
    usd: float | None


def _names(model: str) -> Iterator[tuple[str, bool]]:
    """(name, is_family) to look up, most specific first: the full name, the name without a
    provider prefix, then the family of a point release (gpt-5.2 -> gpt-5)."""
    full = model.lower()
    name = full.rsplit("/", 1)[-1]
    yield full, False
    if name != full:
        yield name, False
    family = re.sub(r"^(gpt-\d+)\.\d+", r"\1", name)
    if family != name:
        yield family, True


def _lookup(model: str, table: Mapping[str, object]) -> tuple[str, bool] | None:
    """(key, matched by family) of the longest table key equal to a name or a dash-prefix of it."""
    for name, family in _names(model):
        hits = [k for k in table if name == k or name.startswith(k + "-")]
        if hits:
            return max(hits, key=len), family
    return None


def _match(model: str, table: Mapping[str, object]) -> str | None:
    found = _lookup(model, table)
    return found[0] if found else None


def listed(model: str, table: Mapping[str, object]) -> bool:
    """Whether ``model`` matches an entry of ``table`` (e.g. the ``--prices`` entries)."""
    return _match(model, table) is not None


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


def image_tokens(model: str, width: int, height: int, detail: str = "low", prices: Prices | None = None) -> int:
    """Input tokens one image costs for ``model`` at ``detail`` ("low", "high", "auto")."""
    own = _match(model, prices) if prices else None
    if own is not None and prices[own].image_tokens is not None:
        return prices[own].image_tokens
    patch = _match(model, PATCH_RULES)
    tile = _match(model, TILE_RULES)
    if patch and (tile is None or len(patch) >= len(tile)):
        return math.ceil(_patches(width, height) * PATCH_RULES[patch])
    if tile is None:
        if own is None:
            _warn_once(model, "image tokens estimated with the gpt-4o tile rule")
        base, per_tile = TILE_RULES[DEFAULT_MODEL]
    else:
        base, per_tile = TILE_RULES[tile]
    return _tile_tokens(width, height, detail, base, per_tile)


def price_per_million(model: str, prices: Prices | None = None) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens (``prices`` first, then the table), or None (with one
    warning) when unknown."""
    if prices and (own := _match(model, prices)) is not None:
        return prices[own].input, prices[own].output
    found = _lookup(model, PRICES)
    if found is None:
        _warn_once(model, "no price known; USD estimates are unavailable (pass --prices FILE)")
        return None
    key, family = found
    if family:
        _warn_once(model, f"priced as its family {key!r} (pass --prices FILE for its own price)")
    return PRICES[key]


def cost_usd(
    model: str, prompt_tokens: int, completion_tokens: int, *, batch: bool = False, prices: Prices | None = None
) -> float | None:
    """USD for a request's token counts, or None for an unpriced model."""
    price = price_per_million(model, prices)
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
    prices: Prices | None = None,
) -> Estimate:
    """Estimate one caption request; output is assumed to use all of ``max_tokens`` (for a
    reasoning model that is the whole completion cap: reasoning plus caption)."""
    input_tokens = text_tokens(text_chars) + image_tokens(model, width, height, detail, prices)
    return Estimate(input_tokens, max_tokens, cost_usd(model, input_tokens, max_tokens, batch=batch, prices=prices))


def png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image, read from its header only."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size
