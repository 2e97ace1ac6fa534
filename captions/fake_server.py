"""The fake OpenAI server's old address, kept for scripts: it lives in ``captions.testing.server``.

    python -m captions.fake_server --port 8123   (the same as python -m captions.testing.server)
"""

from __future__ import annotations

from captions.testing.server import FAULTS, JUNK_LINES, FakeConfig, FakeOpenAI, main

__all__ = ["FAULTS", "JUNK_LINES", "FakeConfig", "FakeOpenAI", "main"]

if __name__ == "__main__":
    main()
