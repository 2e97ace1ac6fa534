"""The HTTP side of the fake OpenAI server (``captions.testing.server``): routes, uploads, and
every fault a chat request can get, the hostile ones included (a drip-fed body, 200s that are
not JSON, a caption of a million characters, a Retry-After of a day).
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import socket
import time
import uuid
from http.server import BaseHTTPRequestHandler
from typing import Any

from captions.testing.answers import error_body

_FAULT_STATUS = {"server_rate_limit": 429, "429_header": 429, "429_ms": 429, "429_message": 429,
                 "500": 500, "503": 503, "slow": 200, "malformed": 200, "text_plain": 200,
                 "insufficient_quota": 429, "401": 401, "400": 400, "drip": 200, "truncated": 200,
                 "invalid_json": 200, "huge_caption": 200, "429_huge": 429, "429_huge_message": 429, "cut_off": 200}


def _error(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return error_body("openai", 0, message, type_, code)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without NODELAY, Nagle plus delayed ACKs
        # add ~40 ms to every answer and the server, not the client, sets the pace.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def fake(self) -> Any:
        """The ``FakeOpenAI`` this server serves."""
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
            if len(parts) == 4 and parts[3] == "content" and cfg.drip_downloads:
                self._drip(entry["data"], "application/octet-stream")
            elif len(parts) == 4 and parts[3] == "content":
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
                now, delay = time.monotonic(), self.fake.config.batch_delay
                unfinished = [b for b in self.fake.batches.values()
                              if b["status"] not in ("completed", "failed") and now - b["_t0"] < delay]
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
        elif fault in ("429_huge", "429_huge_message"):
            wait = cfg.huge_retry_after
            if fault == "429_huge":
                self._send(429, _error(rate_msg, "requests", "rate_limit_exceeded"), {"retry-after": f"{wait:g}"})
            else:
                self._send(429, _error(f"{rate_msg} Please try again in {wait - 1:g}s.", "tokens",
                                       "rate_limit_exceeded"))
        elif fault in ("drip", "truncated", "invalid_json", "huge_caption", "cut_off"):
            self._hostile(fault, body)
        else:
            raise ValueError(f"unknown fault {fault}")
        return _FAULT_STATUS[fault]



    def _hostile(self, fault: str, body: dict[str, Any]) -> None:
        """A 200 that a client must not trust or wait for (the answer was produced: paid)."""
        cfg = self.fake.config
        if fault == "huge_caption":
            body["choices"][0]["message"]["content"] = "A bright structure. " * (cfg.huge_chars // 20)
            self._send(200, body)
        elif fault == "truncated":
            # Usage first, as some servers order it, then cut mid-way: the tokens are readable.
            data = json.dumps({"usage": body.get("usage"), **body}).encode()
            self._send(200, data[: len(data) * 2 // 3])
        elif fault == "cut_off":  # Content-Length promises the whole body; half comes, then the close
            data = json.dumps(body).encode()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.close_connection = True
        elif fault == "invalid_json":
            self._send(200, b'{"id": "chatcmpl-x", "choices": [{"message": {"content": "Axial CT' + b"\x00" * 8)
        else:
            self._drip(json.dumps(body).encode(), "application/json")

    def _drip(self, data: bytes, content_type: str) -> None:
        """The headers at once, then one byte per drip_interval for up to drip_seconds, then the rest."""
        cfg = self.fake.config
        try:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.flush()
            started, sent = time.monotonic(), 0
            while sent < len(data) and time.monotonic() - started < cfg.drip_seconds:
                self.wfile.write(data[sent : sent + 1])
                self.wfile.flush()
                sent += 1
                time.sleep(cfg.drip_interval)
            self.wfile.write(data[sent:])
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
