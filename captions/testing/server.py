"""A fake OpenAI server on 127.0.0.1 for captioning tests, benchmarks and trying a setup
without a key (stdlib only; the tests reach it through the ``tests/fake_openai.py`` fixtures).

Speaks just enough of the API: POST /v1/chat/completions (validates the PNG data URL), POST
/v1/files (multipart), GET /v1/files/{id}[/content], DELETE /v1/files/{id}, POST /v1/batches,
GET /v1/batches[/{id}]. What a chat request gets back (strict reasoning-model checks, reasoning
tokens, open-model flavours) is ``captions.testing.answers``; the HTTP side, faults included,
is ``captions.testing.handler``. With ``rpm_limit`` every answer carries x-ratelimit-* headers.
``batch_api=False`` is a server without Files/Batches (vLLM). Answers are deterministic
functions of the image bytes (and of which prompt was used), so runs can be compared. Faults
are injected per request: scripted by request number, or drawn from a seeded hash of (request
signature, attempt) for a signature's first attempts only, so every request eventually
succeeds. Every request is recorded; GET /_log returns the record.

Hostile servers, as faults and settings: ``drip`` (headers, then one byte per
``drip_interval`` s), ``truncated``/``invalid_json`` (status 200, a body that is not JSON),
``cut_off`` (200 and a Content-Length, then half the body and the connection closed),
``huge_caption`` (a valid answer of ``huge_chars`` characters; ``batch_huge`` for batch
lines), ``drip_downloads`` (file contents drip-fed the same way), ``429_huge`` and ``429_huge_message`` (Retry-After 100000 s / "try again in 99999s"),
``batch_junk`` (lines in every batch output file that are not a usable record, e.g.
``JUNK_LINES``) and ``forget_batches()`` (404 on every batch it knew).

    python -m captions.testing.server --port 8123 --latency 0.2 --rpm-limit 600 --fault 500=0.05
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any

from captions.testing.answers import chat_answer, unit
from captions.testing.handler import Handler

FAULTS = ("429_header", "429_ms", "429_message", "500", "503", "slow", "malformed", "text_plain",
          "insufficient_quota", "401", "400", "drip", "truncated", "invalid_json", "huge_caption",
          "429_huge", "429_huge_message", "cut_off")
# Output-file lines a hostile Batch API may write: not JSON, not an object, no custom_id, and a
# custom_id nobody asked for.
JUNK_LINES = ("this is not json", "[1, 2, 3]", '{"id": "batch_req_x", "response": {"status_code": 200}}',
              '{"id": "batch_req_y", "custom_id": "nobody-asked", "response": {"status_code": 200, "body": {}}}')


@dataclass
class FakeConfig:
    """Server behaviour; fields may be changed while the server runs."""

    api_key: str | None = None  # expected bearer token; None accepts any
    latency: float = 0.0  # seconds before each chat answer
    faults: dict[str, float] = field(default_factory=dict)  # fault -> probability per attempt
    max_faults_per_key: int = 2  # only a signature's first N attempts may be faulted
    script: list[str] = field(default_factory=list)  # faults of the first chat requests ("ok")
    seed: int = 0
    retry_after: float = 0.2  # seconds, for the 429 faults
    slow_seconds: float = 2.0
    refuse: float = 0.0  # fraction of images refused (by image hash) under the main prompt
    refuse_fallback: bool = False  # also refuse the fallback prompt
    fatal: str | None = None  # "insufficient_quota" or "401": every chat request after fatal_after
    fatal_after: int = 0
    rpm_limit: float | None = None  # server-side limit (sliding 60 s window)
    batch_delay: float = 0.3  # seconds from batches.create until the batch is completed
    rate_window: float = 60.0  # seconds of the rpm_limit window (headers report it per minute)
    # Open-model servers: error-body shape, usage ("full", "zero" or "none"), the models served
    # (None: any), a context length (None: unlimited), and whether Files/Batches exist.
    flavor: str = "openai"
    usage: str = "full"
    served_models: list[str] | None = None
    context_length: int | None = None
    batch_api: bool = True
    batch_list: bool = True  # GET /v1/batches (list) supported
    batch_fail: str | None = None  # error code a batch fails with (e.g. "token_limit_exceeded")
    batch_fail_count: int = 1  # how many batches fail that way
    reasoning_tokens: dict[str, int] | None = None  # per effort, over answers.REASONING_TOKENS
    # Hostile servers (see the module docstring).
    drip_interval: float = 0.2  # seconds between the bytes of a "drip" answer
    drip_seconds: float = 30.0  # then the rest at once (an unbounded client still ends)
    drip_downloads: bool = False  # file contents (batch output) are drip-fed too
    huge_chars: int = 1_000_000  # characters of a "huge_caption" answer
    huge_retry_after: float = 100000.0  # seconds a "429_huge" answer asks for
    batch_junk: list[str] = field(default_factory=list)  # lines put in every batch output file
    batch_huge: int = 0  # the first N lines of each batch output get a huge_chars caption

class FakeOpenAI:
    """The server state; ``start()`` serves it from a background thread."""

    def __init__(self, config: FakeConfig | None = None) -> None:
        self.config = config or FakeConfig()
        self.lock = threading.RLock()
        self.log: list[dict[str, Any]] = []
        self.attempts: dict[str, int] = {}
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.enqueued_at_create: list[int] = []  # unfinished batches when each batch was created
        self.window: deque[float] = deque()
        self.failed_batches = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, port: int = 0) -> FakeOpenAI:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.fake = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self.httpd is not None
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    # -- queries for tests -------------------------------------------------------------------
    def chat_log(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.log if r["path"] == "/v1/chat/completions"]

    def answered(self) -> list[dict[str, Any]]:
        """Chat requests that got a well-formed 200 answer (delivered on time)."""
        return [r for r in self.chat_log() if r["status"] == 200 and r["fault"] is None]

    def calls(self, method: str, path: str) -> int:
        with self.lock:
            return sum(1 for r in self.log if r["method"] == method and r["path"] == path)

    def forget_batches(self) -> None:
        """Forget every batch (a retrieve answers 404), as a service that lost or purged them."""
        with self.lock:
            self.batches.clear()

    # -- chat logic --------------------------------------------------------------------------
    def decide_fault(self, n: int, signature: str) -> str | None:
        cfg = self.config
        if n < len(cfg.script):
            return None if cfg.script[n] == "ok" else cfg.script[n]
        if cfg.fatal and n >= cfg.fatal_after:
            return cfg.fatal
        with self.lock:
            attempt = self.attempts.get(signature, 0)
            self.attempts[signature] = attempt + 1
        if attempt >= cfg.max_faults_per_key:
            return None
        u, acc = unit(cfg.seed, signature, attempt), 0.0
        for name, p in sorted(cfg.faults.items()):
            acc += p
            if u < acc:
                return name
        return None

    def answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, Any]]:
        """(status, json, info) for a chat request body, without faults or latency."""
        return chat_answer(self.config, body)

    def rate_limited(self) -> float | None:
        """Seconds until a slot frees up, if the server-side limit is hit."""
        limit = self.config.rpm_limit
        if not limit:
            return None
        now, span = time.monotonic(), self.config.rate_window
        with self.lock:
            while self.window and now - self.window[0] >= span:
                self.window.popleft()
            if len(self.window) >= limit:
                return span - (now - self.window[0])
            self.window.append(now)
        return None

    def ratelimit_headers(self) -> dict[str, str]:
        """x-ratelimit-* headers as OpenAI sends them (limits per minute)."""
        limit = self.config.rpm_limit
        if not limit:
            return {}
        now, span = time.monotonic(), self.config.rate_window
        with self.lock:
            live = [t for t in self.window if now - t < span]
        reset = span - (now - live[0]) if live else 0.0
        return {"x-ratelimit-limit-requests": f"{limit * 60.0 / span:g}",
                "x-ratelimit-remaining-requests": str(max(0, int(limit) - len(live))),
                "x-ratelimit-reset-requests": f"{max(reset, 0.001) * 1000:.0f}ms"}

    # -- batches -----------------------------------------------------------------------------
    def add_file(self, data: bytes, purpose: str, filename: str) -> dict[str, Any]:
        obj = {"id": "file-" + uuid.uuid4().hex[:24], "object": "file", "bytes": len(data),
               "created_at": int(time.time()), "filename": filename, "purpose": purpose,
               "status": "processed"}
        with self.lock:
            self.files[obj["id"]] = {"meta": obj, "data": data}
        return obj

    def batch_view(self, batch_id: str) -> dict[str, Any] | None:
        with self.lock:
            batch = self.batches.get(batch_id)
        if batch is None:
            return None
        if batch["status"] not in ("completed", "failed"):
            if time.monotonic() - batch["_t0"] < self.config.batch_delay:
                batch["status"] = "in_progress"
            elif self.config.batch_fail and self.failed_batches < self.config.batch_fail_count:
                self.failed_batches += 1
                message = ("Enqueued token limit reached for gpt-4o in organization org-fake. Limit: "
                           "90,000 enqueued tokens. Please try submitting an input file with fewer "
                           "tokens, or wait for your in-progress batches to complete.")
                batch.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": [
                    {"code": self.config.batch_fail, "message": message, "param": None, "line": None}]})
            else:
                self._run_batch(batch)
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def _run_batch(self, batch: dict[str, Any]) -> None:
        out, err = [], []
        lines = self.files[batch["input_file_id"]]["data"].decode().splitlines()
        for raw in lines:
            line = json.loads(raw)
            status, body, info = self.answer(line["body"])
            if status == 200 and len(out) < self.config.batch_huge:
                body["choices"][0]["message"]["content"] = "A bright structure. " * (self.config.huge_chars // 20)
            record = {"id": "batch_req_" + uuid.uuid4().hex[:16], "custom_id": line["custom_id"],
                      "response": {"status_code": status, "request_id": "req_" + uuid.uuid4().hex[:16],
                                   "body": body}, "error": None}
            (out if status == 200 else err).append(json.dumps(record))
            with self.lock:
                self.log.append({"method": "BATCH", "path": "batch-line", "status": status, "fault": None,
                                 "custom_id": line["custom_id"], **info})
        # Output order deliberately differs from input order: callers must join by custom_id.
        out.reverse()
        for i, junk in enumerate(self.config.batch_junk):
            out.insert(min(len(out), 2 * i + 1), junk)
        with self.lock:
            batch["output_file_id"] = self.add_file("\n".join(out).encode(), "batch_output", "out.jsonl")["id"]
            if err:
                batch["error_file_id"] = self.add_file("\n".join(err).encode(), "batch_output", "err.jsonl")["id"]
            batch.update(status="completed", completed_at=int(time.time()),
                         request_counts={"total": len(lines), "completed": len(out), "failed": len(err)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--rpm-limit", type=float, default=None)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--refuse", type=float, default=0.0)
    parser.add_argument("--batch-delay", type=float, default=0.3)
    parser.add_argument("--fault", action="append", default=[], help="NAME=PROBABILITY, e.g. 500=0.1")
    parser.add_argument("--flavor", default="openai", choices=("openai", "vllm", "ollama", "fastapi"))
    parser.add_argument("--usage", default="full", choices=("full", "zero", "none"))
    parser.add_argument("--no-batch-api", action="store_true", help="no Files/Batches endpoints (like vLLM)")
    parser.add_argument("--context-length", type=int, default=None)
    args = parser.parse_args()
    faults = {name: float(p) for name, p in (f.split("=") for f in args.fault)}
    config = FakeConfig(api_key=args.api_key, latency=args.latency, faults=faults, refuse=args.refuse,
                        rpm_limit=args.rpm_limit, batch_delay=args.batch_delay, flavor=args.flavor,
                        usage=args.usage, batch_api=not args.no_batch_api, context_length=args.context_length)
    fake = FakeOpenAI(config).start(args.port)
    print(f"fake OpenAI server at {fake.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
