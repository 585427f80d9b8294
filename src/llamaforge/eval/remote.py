"""A running OpenAI-compatible server as the model under evaluation (`llamaforge eval ... --server URL`).

Scoring uses /v1/completions with `echo: true, logprobs: 1, max_tokens: 0` on token-id prompts: the server returns
the log-probability of every prompt token, and the continuation's are the ones after the context. Token ids come
from the server's own tokenizer (POST /tokenize, the vLLM shape that `llamaforge serve` also speaks), split the
way `InProcessBackend` splits them, so a served model scores exactly like the same model in process. A server
without /tokenize is scored on text prompts, the continuation located by the tokens' `text_offset`. A server
that refuses `max_tokens: 0` is asked for one token, which is then ignored (what lm-evaluation-harness does).
Generation uses /v1/completions (raw prompts, several per request) or /v1/chat/completions (chat tasks).
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import httpx

from ..errors import LlamaforgeError
from .backends import GREEDY, split_trailing_space

PROMPTS_PER_REQUEST = 16
TIMEOUT_S = 600.0


class ServerError(LlamaforgeError):
    """The server could not be reached or answered with an error."""


class ServerBackend:
    """Evaluate the model `model` served at `url` (the server's root, e.g. http://127.0.0.1:11435)."""

    kind = "server"

    def __init__(self, url: str, model: str, *, api_key: str | None = None, batch_size: int | None = None,
                 timeout: float = TIMEOUT_S):
        if not url.startswith(("http://", "https://")):
            raise ServerError(f"--server must be an http(s) URL, got {url!r}")
        self.url = url.rstrip("/")
        for suffix in ("/v1/completions", "/v1/chat/completions", "/v1"):
            if self.url.endswith(suffix):
                self.url = self.url[:-len(suffix)]
        self.model = model
        self.label = f"{model}@{self.url}"
        self.batch_size = batch_size or 8
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self._tokenize_ok: bool | None = None
        self._zero_ok = True
        self._info: dict | None = None

    # -- HTTP -----------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        try:
            return self.client.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise ServerError(f"cannot reach the server at {self.url}: {e}") from None

    def _post(self, path: str, body: dict) -> dict:
        r = self._request("POST", path, body)
        if r.status_code >= 400:
            raise ServerError(f"{path}: HTTP {r.status_code}: {_error_text(r)}")
        try:
            return r.json()
        except json.JSONDecodeError:
            raise ServerError(f"{path}: the server's answer is not JSON") from None

    # -- tokens ---------------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool) -> list[int] | None:
        if self._tokenize_ok is False:
            return None
        r = self._request("POST", "/tokenize", {"model": self.model, "prompt": text,
                                                "add_special_tokens": add_special})
        if r.status_code in (404, 405):
            self._tokenize_ok = False
            return None
        if r.status_code >= 400:
            raise ServerError(f"/tokenize: HTTP {r.status_code}: {_error_text(r)}")
        self._tokenize_ok = True
        return list(r.json()["tokens"])

    def tokenizer_info(self) -> dict:
        if self._info is None:
            r = self._request("GET", f"/tokenizer_info?model={self.model}")
            self._info = r.json() if r.status_code == 200 else {}
        return self._info

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]] | None:
        """Token ids as InProcessBackend.encode_pair makes them, from the server's tokenizer (None without
        /tokenize)."""
        if context == "":
            cont = self.tokenize(continuation, False)
            if cont is None:
                return None
            prefix = self.tokenize("", True) or []
            if not prefix:
                raise ServerError("an empty context needs the model's BOS token and the server gave none")
            return prefix[:1], cont
        context, continuation = split_trailing_space(context, continuation)
        whole = self.tokenize(context + continuation, True)
        if whole is None:
            return None
        ctx = self.tokenize(context, True)
        return ctx, whole[len(ctx):]

    # -- scoring --------------------------------------------------------------------------------------------
    def _echo(self, prompts: list) -> list[dict]:
        """logprobs objects (tokens, token_logprobs, top_logprobs, text_offset) of the prompts, prompt tokens
        only."""
        body = {"model": self.model, "prompt": prompts, "echo": True, "logprobs": 1, "temperature": 0.0,
                "max_tokens": 0 if self._zero_ok else 1}
        r = self._request("POST", "/v1/completions", body)
        if r.status_code == 400 and self._zero_ok and "max_tokens" in r.text:
            self._zero_ok = False
            return self._echo(prompts)
        if r.status_code >= 400:
            raise ServerError(f"/v1/completions: HTTP {r.status_code}: {_error_text(r)}")
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        out = []
        for c in choices:
            lp = c.get("logprobs") or {}
            if not lp.get("token_logprobs"):
                raise ServerError("the server returned no prompt logprobs (echo + logprobs unsupported); it "
                                  "cannot score log-likelihood tasks")
            if not self._zero_ok:  # drop the one generated token
                lp = {k: v[:-1] for k, v in lp.items() if isinstance(v, list)}
            out.append(lp)
        return out

    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]],
                     progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
        out = []
        for a in range(0, len(pairs), PROMPTS_PER_REQUEST):
            chunk = pairs[a:a + PROMPTS_PER_REQUEST]
            for (ctx, cont), lp in zip(chunk, self._echo([list(c) + list(x) for c, x in chunk])):
                out.append(_sum_from(lp, len(ctx)))
            if progress is not None:
                progress(len(chunk))
        return out

    def loglikelihood(self, pairs: Sequence[tuple[str, str]],
                      progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
        first = self.encode_pair(*pairs[0]) if pairs else None
        if first is not None:
            return self.score_tokens([first] + [self.encode_pair(c, x) for c, x in pairs[1:]], progress)
        out = []
        for a in range(0, len(pairs), PROMPTS_PER_REQUEST):  # text prompts: split by character offsets
            chunk = [split_trailing_space(c, x) for c, x in pairs[a:a + PROMPTS_PER_REQUEST]]
            for (c, x), lp in zip(chunk, self._echo([c + x for c, x in chunk])):
                offsets = lp.get("text_offset") or []
                start = next((i for i, o in enumerate(offsets) if o >= len(c)), len(offsets))
                out.append(_sum_from(lp, max(start, 1)))
            if progress is not None:
                progress(len(chunk))
        return out

    def token_logprobs(self, ids: list[int]) -> list[float | None]:
        """log p of every token of `ids` (None for the first)."""
        return list(self._echo([list(ids)])[0]["token_logprobs"])

    # -- generation -----------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str | list[dict]], *, max_tokens: int, stop: Sequence[str] = (),
                 progress: Callable[[int], None] | None = None) -> list[str]:
        base = dict(GREEDY, model=self.model, max_tokens=max_tokens)
        base.pop("repeat_penalty")  # not an OpenAI field
        if stop:
            base["stop"] = list(stop)
        chats = [i for i, p in enumerate(prompts) if isinstance(p, list)]
        texts = [i for i, p in enumerate(prompts) if not isinstance(p, list)]
        out = [""] * len(prompts)
        for a in range(0, len(texts), PROMPTS_PER_REQUEST):
            idx = texts[a:a + PROMPTS_PER_REQUEST]
            res = self._post("/v1/completions", dict(base, prompt=[prompts[i] for i in idx]))
            for c in res["choices"]:
                out[idx[c["index"]]] = c.get("text") or ""
            if progress is not None:
                progress(len(idx))

        def one(i):
            res = self._post("/v1/chat/completions", dict(base, messages=prompts[i]))
            return i, res["choices"][0]["message"].get("content") or ""
        with ThreadPoolExecutor(max_workers=self.batch_size) as pool:  # the server batches concurrent requests
            for i, text in pool.map(one, chats):
                out[i] = text
                if progress is not None:
                    progress(1)
        return out

    def close(self) -> None:
        self.client.close()


def _sum_from(lp: dict, first: int) -> tuple[float, bool]:
    """(sum of token_logprobs[first:], every one of them the top choice)."""
    vals = lp["token_logprobs"][first:]
    tops = (lp.get("top_logprobs") or [None] * len(lp["token_logprobs"]))[first:]
    total = float(sum(v for v in vals if v is not None))
    greedy = all(t is not None and v is not None and v >= max(t.values()) for v, t in zip(vals, tops))
    return total, greedy


def _error_text(r: httpx.Response) -> str:
    try:
        e = r.json().get("error")
        return e.get("message") if isinstance(e, dict) else str(e)
    except (json.JSONDecodeError, AttributeError):
        return r.text[:300]
