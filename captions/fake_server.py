"""A fake OpenAI server on 127.0.0.1 for captioning tests, benchmarks and trying a setup
without a key (stdlib only; the tests reach it through the ``tests/fake_openai.py`` fixtures).

Speaks just enough of the API: POST /v1/chat/completions (validates the PNG data URL), POST
/v1/files (multipart), GET /v1/files/{id}[/content], DELETE /v1/files/{id}, POST /v1/batches,
GET /v1/batches[/{id}]. What a chat request gets back (strict reasoning-model checks, reasoning
tokens, open-model flavours) is ``captions.fake_answers``. With ``rpm_limit`` every answer
carries x-ratelimit-* headers. ``batch_api=False`` is a server without Files/Batches (vLLM).
Answers are deterministic functions of the image bytes (and of which prompt was used), so runs
can be compared. Faults are injected per request: scripted by request number, or drawn from a
seeded hash of (request signature, attempt) for a signature's first attempts only, so every
request eventually succeeds. Every request is recorded; GET /_log returns the record.

    python -m captions.fake_server --port 8123 --latency 0.2 --rpm-limit 600 --fault 500=0.05
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import json
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from captions.fake_answers import chat_answer, error_body, unit

FAULTS = ("429_header", "429_ms", "429_message", "500", "503", "slow", "malformed", "text_plain",
          "insufficient_quota", "401", "400")


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
    reasoning_tokens: dict[str, int] | None = None  # per effort, over fake_answers.REASONING_TOKENS

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
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
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
            record = {"id": "batch_req_" + uuid.uuid4().hex[:16], "custom_id": line["custom_id"],
                      "response": {"status_code": status, "request_id": "req_" + uuid.uuid4().hex[:16],
                                   "body": body}, "error": None}
            (out if status == 200 else err).append(json.dumps(record))
            with self.lock:
                self.log.append({"method": "BATCH", "path": "batch-line", "status": status, "fault": None,
                                 "custom_id": line["custom_id"], **info})
        # Output order deliberately differs from input order: callers must join by custom_id.
        out.reverse()
        with self.lock:
            batch["output_file_id"] = self.add_file("\n".join(out).encode(), "batch_output", "out.jsonl")["id"]
            if err:
                batch["error_file_id"] = self.add_file("\n".join(err).encode(), "batch_output", "err.jsonl")["id"]
            batch.update(status="completed", completed_at=int(time.time()),
                         request_counts={"total": len(lines), "completed": len(out), "failed": len(err)})


_FAULT_STATUS = {"server_rate_limit": 429, "429_header": 429, "429_ms": 429, "429_message": 429,
                 "500": 500, "503": 503, "slow": 200, "malformed": 200, "text_plain": 200,
                 "insufficient_quota": 429, "401": 401, "400": 400}


def _error(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return error_body("openai", 0, message, type_, code)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without NODELAY, Nagle plus delayed ACKs
        # add ~40 ms to every answer and the server, not the client, sets the pace.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def fake(self) -> FakeOpenAI:
        return self.server.fake  # type: ignore[attr-defined]

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> bool:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-request-id", "req_" + uuid.uuid4().hex[:16])
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def _record(self, **info: Any) -> None:
        with self.fake.lock:
            self.fake.log.append({"method": self.command, "path": self.path.split("?")[0], **info})

    def _authorized(self) -> bool:
        expected = self.fake.config.api_key
        return expected is None or self.headers.get("Authorization") == f"Bearer {expected}"

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        self._record(status=200, fault=None)
        if path == "/_log":
            with self.fake.lock:
                self._send(200, self.fake.log)
            return
        parts = path.strip("/").split("/")
        cfg = self.fake.config
        if parts[:2] in (["v1", "files"], ["v1", "batches"]) and not cfg.batch_api:
            self._send(404, error_body(cfg.flavor, 404, f"Not Found: {path}"))
        elif parts == ["v1", "batches"] and not cfg.batch_list:
            self._send(405, error_body(cfg.flavor, 405, "Method Not Allowed"))
        elif parts[:2] == ["v1", "files"] and len(parts) >= 3 and parts[2] in self.fake.files:
            entry = self.fake.files[parts[2]]
            if len(parts) == 4 and parts[3] == "content":
                self._send(200, entry["data"], content_type="application/octet-stream")
            else:
                self._send(200, entry["meta"])
        elif parts == ["v1", "batches"]:
            with self.fake.lock:
                ids = list(self.fake.batches)
            data = [self.fake.batch_view(i) for i in reversed(ids)]
            self._send(200, {"object": "list", "data": data, "has_more": False,
                             "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None})
        elif parts[:2] == ["v1", "batches"] and len(parts) == 3 and (view := self.fake.batch_view(parts[2])):
            self._send(200, view)
        else:
            self._send(404, _error(f"No such resource: {path}", "invalid_request_error"))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        path = self.path.split("?")[0]
        if not self._authorized():
            self._record(status=401, fault="auth")
            self._send(401, _error("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"))
            return
        if path == "/v1/chat/completions":
            self._chat(raw)
        elif path in ("/v1/files", "/v1/batches") and not self.fake.config.batch_api:
            self._record(status=404, fault=None)
            self._send(404, error_body(self.fake.config.flavor, 404, f"Not Found: {path}"))
        elif path == "/v1/files":
            self._upload(raw)
        elif path == "/v1/batches":
            body = json.loads(raw)
            if body.get("input_file_id") not in self.fake.files:
                self._record(status=400, fault=None)
                self._send(400, _error("input file not found", "invalid_request_error"))
                return
            batch = {"id": "batch_" + uuid.uuid4().hex[:24], "object": "batch", "endpoint": body["endpoint"],
                     "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
                     "status": "validating", "created_at": int(time.time()), "output_file_id": None,
                     "error_file_id": None, "metadata": body.get("metadata"),
                     "request_counts": {"total": 0, "completed": 0, "failed": 0}, "_t0": time.monotonic()}
            with self.fake.lock:
                now = time.monotonic()
                unfinished = [b for b in self.fake.batches.values()
                              if b["status"] not in ("completed", "failed") and now - b["_t0"] < self.fake.config.batch_delay]
                self.fake.enqueued_at_create.append(len(unfinished))
                self.fake.batches[batch["id"]] = batch
            self._record(status=200, fault=None, batch_id=batch["id"])
            self._send(200, {k: v for k, v in batch.items() if not k.startswith("_")})
        else:
            self._record(status=404, fault=None)
            self._send(404, _error(f"Unknown path {path}", "invalid_request_error"))

    def do_DELETE(self) -> None:
        path = self.path.split("?")[0]
        parts = path.strip("/").split("/")
        if parts[:2] == ["v1", "files"] and len(parts) == 3 and parts[2] in self.fake.files:
            with self.fake.lock:
                del self.fake.files[parts[2]]
            self._record(status=200, fault=None, file_id=parts[2])
            self._send(200, {"id": parts[2], "object": "file", "deleted": True})
        else:
            self._record(status=404, fault=None)
            self._send(404, _error(f"No such file: {path}", "invalid_request_error"))

    def _upload(self, raw: bytes) -> None:
        header = f"Content-Type: {self.headers.get('Content-Type')}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + raw)
        fields: dict[str, Any] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = (part.get_filename(), part.get_payload(decode=True))
        if "file" not in fields or fields.get("purpose", (None, b""))[1] != b"batch":
            self._record(status=400, fault=None)
            self._send(400, _error("expected a file with purpose=batch", "invalid_request_error"))
            return
        obj = self.fake.add_file(fields["file"][1], "batch", fields["file"][0] or "input.jsonl")
        self._record(status=200, fault=None, file_id=obj["id"], purpose="batch")
        self._send(200, obj)

    def _chat(self, raw: bytes) -> None:
        fake, cfg = self.fake, self.fake.config
        with fake.lock:
            n = sum(1 for r in fake.log if r["path"] == "/v1/chat/completions")
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
            fake.log.append(entry := {"method": "POST", "path": "/v1/chat/completions", "n": n,
                                      "t0": time.monotonic(), "status": None, "fault": None})
        try:
            status, body, info = fake.answer(json.loads(raw))
            entry.update(info)
            fault = fake.decide_fault(n, info["signature"]) if status == 200 else None
            limited = fake.rate_limited() if status == 200 and fault is None else None
            if limited is not None:
                fault = "server_rate_limit"
            time.sleep(cfg.latency)
            entry.update(fault=fault)
            entry["status"] = self._respond(status, body, fault, limited)
        finally:
            with fake.lock:
                fake.in_flight -= 1
                entry["t1"] = time.monotonic()

    def _respond(self, status: int, body: dict[str, Any], fault: str | None, limited: float | None) -> int:
        cfg = self.fake.config
        rate_msg = "Rate limit reached for requests on tokens per min (TPM): Limit 30000."
        if fault is None:
            self._send(status, body, self.fake.ratelimit_headers() if status == 200 else None)
            return status
        if fault == "server_rate_limit":
            self._send(429, _error(rate_msg, "requests", "rate_limit_exceeded"),
                       {"retry-after-ms": str(int((limited or 0.1) * 1000))})
        elif fault == "429_header":
            self._send(429, _error(rate_msg, "requests", "rate_limit_exceeded"),
                       {"retry-after": f"{cfg.retry_after:g}"})
        elif fault == "429_ms":
            self._send(429, _error(rate_msg, "requests", "rate_limit_exceeded"),
                       {"retry-after-ms": str(int(cfg.retry_after * 1000))})
        elif fault == "429_message":
            self._send(429, _error(f"{rate_msg} Please try again in {cfg.retry_after:g}s. Visit "
                                   "https://platform.openai.com/account/rate-limits", "tokens",
                                   "rate_limit_exceeded"))
        elif fault in ("500", "503"):
            self._send(int(fault), _error("The server had an error while processing your request.",
                                          "server_error"))
        elif fault == "slow":
            time.sleep(cfg.slow_seconds)
            self._send(status, body)
        elif fault == "malformed":
            self._send(200, json.dumps(body).encode()[:40])
        elif fault == "text_plain":
            self._send(200, b"<html>bad gateway</html>", content_type="text/html")
        elif fault == "insufficient_quota":
            self._send(429, _error("You exceeded your current quota, please check your plan and billing "
                                   "details.", "insufficient_quota", "insufficient_quota"))
        elif fault == "401":
            key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            # Echo the whole key (real servers mask it) so tests prove the client redacts it.
            self._send(401, _error(f"Incorrect API key provided: {key}. You can find your API key "
                                   "at https://platform.openai.com/account/api-keys.",
                                   "invalid_request_error", "invalid_api_key"))
        elif fault == "400":
            self._send(400, _error("Invalid image.", "invalid_request_error", "invalid_image"))
        else:
            raise ValueError(f"unknown fault {fault}")
        return _FAULT_STATUS[fault]


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
