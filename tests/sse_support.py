"""Reading OpenAI-style server-sent events in tests (shared by the server and determinism tests)."""
from __future__ import annotations

import json

import httpx


def stream_chat_text(url: str, body: dict, timeout: float = 120) -> str:
    """POST a streaming chat completion to `url` (the server root) and join the content deltas of choice 0."""
    out = []
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ch = json.loads(line[6:])["choices"]
                if ch:
                    out.append(ch[0]["delta"].get("content") or "")
    return "".join(out)
