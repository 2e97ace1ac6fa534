"""The image bytes a request sends: the rendered PNG, or a client-side downscale (--image-size).

Open-model servers ignore ``detail`` and spend image tokens by pixel count (often many per 28 px
patch), so a 512 px slice can overflow a small context. ``--image-size N`` resizes the longest
side to N before sending (never upscales); the result is deterministic, so the cache key (which
records N) still names exactly what was asked.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image


def scaled_size(width: int, height: int, size: int | None) -> tuple[int, int]:
    """(width, height) after fitting the longest side into ``size`` (None: unchanged)."""
    longest = max(width, height)
    if size is None or longest <= size:
        return width, height
    scale = size / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def image_bytes(path: str | Path, size: int | None = None) -> bytes:
    """PNG bytes to send for ``path``, downscaled to ``size`` on the longest side when larger."""
    data = Path(path).read_bytes()
    if size is None:
        return data
    with Image.open(io.BytesIO(data)) as im:
        target = scaled_size(*im.size, size)
        if target == im.size:
            return data
        out = io.BytesIO()
        im.resize(target, Image.Resampling.LANCZOS).save(out, format="PNG")
    return out.getvalue()
