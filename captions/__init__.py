"""Slice captioning: versioned prompts, an OpenAI-compatible client with one retry layer and
client-side rate limits, a durable content-addressed caption cache, cost estimates, the Batch
API flow and a deterministic offline captioner.

One ``CaptionOptions`` (``options``) travels from `curate caption` (``med3dinsight/caption.py``, which
parses and prints) through ``release.run_release`` to ``engine.run_captions`` unchanged;
``budget`` decides what --budget and --max-usd admit, ``plan`` what to send, ``sync`` and
``batch`` send it, and ``jobs`` makes every cache key and cache row. Nothing a server sends is
trusted as is: ``answers`` screens chat completions and ``batch_output`` batch output lines.
``testing`` is a local OpenAI-compatible server, hostile modes included, for tests and
benchmarks (``fake_server`` is its old address).
"""
