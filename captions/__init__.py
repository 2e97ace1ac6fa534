"""Slice captioning: versioned prompts, an OpenAI-compatible client with one retry layer and
client-side rate limits, a durable content-addressed caption cache, cost estimates, the Batch
API flow and a deterministic offline captioner. ``captions.engine.run_captions`` ties them
together; the CLI lives in ``curation``'s command layer and only parses and prints.
"""
