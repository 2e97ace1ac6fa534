"""What the fake server (``captions.testing.server``) answers to one chat request, as the real
services do: OpenAI's strict checks for reasoning models, reasoning-token accounting, and the
open-model flavours (vLLM, SGLang, Ollama, LMDeploy) with their own error bodies, missing usage,
ignored ``detail`` and a context length that large images overflow.

Pure functions of the config and the request body (plus a seeded hash), so runs can be compared.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import time
import uuid
from typing import Any

FLAVORS = ("openai", "vllm", "ollama", "fastapi")
# Reasoning tokens a fake reasoning model spends per effort (OpenAI's default effort is medium).
REASONING_TOKENS = {"none": 0, "minimal": 0, "low": 300, "medium": 1200, "high": 5000, "xhigh": 9000}


def unit(*parts: Any) -> float:
    """A seeded uniform number in [0, 1) from any JSON-able parts."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def error_body(flavor: str, status: int, message: str, type_: str = "invalid_request_error",
               code: str | None = None) -> dict[str, Any]:
    """An error body in the shape a server of ``flavor`` sends."""
    if flavor == "vllm":  # also SGLang and LMDeploy
        return {"object": "error", "message": message, "type": "BadRequestError" if status == 400 else
                "NotFoundError" if status == 404 else type_, "param": None, "code": status}
    if flavor == "ollama":
        return {"error": message}
    if flavor == "fastapi":
        return {"detail": message}
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def is_reasoning(model: str) -> bool:
    name = model.rsplit("/", 1)[-1].lower()
    return bool(re.match(r"^(o\d|gpt-5)", name)) and "-chat" not in name


def png_dims(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    return struct.unpack(">II", png[16:24])


def _parse(body: dict[str, Any]) -> tuple[str, str, list[tuple[str, str, tuple[int, int]]]]:
    """(model, joined text, [(image sha, detail, dims)]); raises KeyError/TypeError/ValueError."""
    model = body["model"]
    texts, images = [], []
    for message in body["messages"]:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            if part["type"] == "text":
                texts.append(part["text"])
            elif part["type"] == "image_url":
                url = part["image_url"]["url"]
                prefix = "data:image/png;base64,"
                if not url.startswith(prefix):
                    raise ValueError("image_url is not a PNG data URL")
                png = base64.b64decode(url[len(prefix):], validate=True)
                if not png.startswith(b"\x89PNG\r\n\x1a\n"):
                    raise ValueError("image is not a PNG")
                images.append((hashlib.sha256(png).hexdigest(), part["image_url"].get("detail", "auto"),
                               png_dims(png)))
    if len(images) != 1 or images[0][1] not in ("low", "high", "auto"):
        raise ValueError("expected exactly one image with detail low|high|auto")
    return model, "\n".join(texts), images


def _strict_params(cfg: Any, model: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """OpenAI's 400s for parameters a model does not take (only the openai flavour checks)."""
    if cfg.flavor != "openai":
        return None
    def bad(message: str, code: str) -> tuple[int, dict[str, Any]]:
        return 400, error_body("openai", 400, message, code=code)
    if is_reasoning(model):
        if "max_tokens" in body:
            return bad("Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                       "'max_completion_tokens' instead.", "unsupported_parameter")
        if body.get("temperature") not in (None, 1, 1.0):
            return bad("Unsupported value: 'temperature' does not support 0 with this model. Only the "
                       "default (1) value is supported.", "unsupported_value")
        if body.get("reasoning_effort") not in (None, *REASONING_TOKENS):
            return bad(f"Unsupported value: 'reasoning_effort' does not support "
                       f"{body.get('reasoning_effort')!r} with this model.", "unsupported_value")
    elif "reasoning_effort" in body:
        return bad("Unsupported parameter: 'reasoning_effort' is not supported with this model.",
                   "unsupported_parameter")
    return None


def chat_answer(cfg: Any, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(status, json, info) for a chat request body, without faults or latency.

    ``cfg`` is a ``FakeConfig``; ``info`` is what the server's log records about the request.
    """
    flavor = cfg.flavor
    try:
        model, text, images = _parse(body)
    except (KeyError, TypeError, ValueError) as exc:
        return 400, error_body(flavor, 400, f"Invalid request: {exc}", code="invalid_image"), {}
    image_sha, detail, (width, height) = images[0]
    if cfg.served_models is not None and model not in cfg.served_models:
        message = (f'model "{model}" not found, try pulling it first' if flavor == "ollama"
                   else f"The model `{model}` does not exist.")
        return 404, error_body(flavor, 404, message, code="model_not_found"), {}
    strict = _strict_params(cfg, model, body)
    if strict is not None:
        return strict[0], strict[1], {}
    cap = body.get("max_completion_tokens", body.get("max_tokens"))
    if flavor == "openai":
        image_tokens = 255 if detail == "high" else 85
    else:  # open models ignore detail and pay per 28-px patch
        image_tokens = -(-width // 28) * -(-height // 28)
    prompt_tokens = len(text) // 4 + image_tokens
    if cfg.context_length is not None and prompt_tokens + (cap or 0) > cfg.context_length:
        message = (f"This model's maximum context length is {cfg.context_length} tokens. However, you "
                   f"requested {prompt_tokens + (cap or 0)} tokens ({prompt_tokens} in the messages, "
                   f"{cap} in the completion). Please reduce the length of the messages or completion.")
        return 400, error_body(flavor, 400, message, code="context_length_exceeded"), {}
    signature = hashlib.sha256(json.dumps(
        [model, image_sha, text, cap, body.get("temperature"), detail, body.get("reasoning_effort")]).encode()
    ).hexdigest()
    fallback = "educational" in text
    info: dict[str, Any] = {"image_sha256": image_sha, "signature": signature, "fallback": fallback,
                            "text": text, "model": model, "image_size": [width, height],
                            "reasoning_effort": body.get("reasoning_effort")}
    refuse = unit("refuse", image_sha) < cfg.refuse and (not fallback or cfg.refuse_fallback)
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
    if refuse and int(image_sha[0], 16) % 2:
        message["refusal"] = "I'm sorry, I can't assist with that request."
    elif refuse:
        message["content"] = "I'm sorry, but I can't help with analyzing this medical image."
    else:
        kind = "Anatomy description" if fallback else "Synthetic caption"
        message["content"] = (f"{kind} {image_sha[:12]}: a grayscale cross-sectional slice with a "
                              f"bright central structure and darker surroundings.")
    info["refused"] = refuse
    answer_tokens = len(message["content"] or message["refusal"]) // 4
    spend = {**REASONING_TOKENS, **(cfg.reasoning_tokens or {})}
    reasoning = spend[body.get("reasoning_effort") or "medium"] if is_reasoning(model) else 0
    finish = "stop"
    if cap is not None and reasoning + answer_tokens > cap:
        # The service spends the cap on reasoning first: nothing is left for the answer.
        message.update(content="", refusal=None)
        reasoning, answer_tokens, finish = min(reasoning, cap), max(0, cap - reasoning), "length"
        info["truncated"] = True
    completion_tokens = reasoning + (answer_tokens if finish == "stop" else 0)
    if finish == "length":
        completion_tokens = cap
    payload: dict[str, Any] = {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion",
        "created": int(time.time()), "model": model, "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
    }
    if cfg.usage == "full":
        payload["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens,
                            "completion_tokens_details": {"reasoning_tokens": reasoning}}
    elif cfg.usage == "zero":
        payload["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return 200, payload, info
