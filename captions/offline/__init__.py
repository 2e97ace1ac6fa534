"""Deterministic offline captioner: grounded text from slice metadata and the label map.

The default provider when no API key is set (and for the demo). It never looks at pixels, so
every statement is true by construction (``compose``'s docstring says what it says), and
``caption_diversity`` measures how varied a set of captions is.
"""

from captions.offline.compose import (
    OFFLINE_MODEL,
    OFFLINE_PROMPT_VERSION,
    OFFLINE_PROVIDER,
    context_extras,
    offline_caption,
    structures_text,
)
from captions.offline.diversity import FEW_DISTINCT, caption_diversity, diversity_line

__all__ = [
    "FEW_DISTINCT", "OFFLINE_MODEL", "OFFLINE_PROMPT_VERSION", "OFFLINE_PROVIDER", "caption_diversity",
    "context_extras", "diversity_line", "offline_caption", "structures_text",
]
