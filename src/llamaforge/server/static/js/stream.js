// One streamed answer through the server's OpenAI route (/v1/chat/completions, stream: true): the page has
// no generation path of its own. Collects text, finish reason, usage, timing and llamaforge's additions
// beside the message (citations, guard verdicts), and tells a stop, a server error and a broken connection
// apart, keeping whatever text had arrived.

import { ApiError, request, sseEvents } from "./api.js";

// The request body for a conversation's history and settings. Unset parameters are left to the server.
export function chatBody(model, history, settings, { retrieval = true } = {}) {
  const messages = [];
  if (settings.system && settings.system.trim()) messages.push({ role: "system", content: settings.system });
  for (const m of history) messages.push({ role: m.role, content: m.content });
  const body = { model, messages, stream: true, stream_options: { include_usage: true } };
  for (const name of ["temperature", "top_p", "max_tokens", "seed"]) {
    if (settings[name] !== null && settings[name] !== undefined) body[name] = settings[name];
  }
  if (settings.json_mode) body.response_format = { type: "json_object" };
  if (retrieval && settings.retrieval && settings.retrieval.collection) {
    body.retrieval = { collection: settings.retrieval.collection, k: settings.retrieval.k || 4 };
  }
  return body;
}

const KNOWN_CHOICE_KEYS = new Set(["index", "delta", "logprobs", "finish_reason"]);

// Stream one answer. onText(fullText) is called as text arrives. Resolves (never rejects) with
// {text, finish_reason, usage, timing, extras, stopped, error, errorStatus, started}.
export async function streamAnswer(body, signal, onText) {
  const out = { text: "", finish_reason: null, usage: null, timing: null, extras: {}, stopped: false,
                error: null, errorStatus: 0, started: false };
  const t0 = performance.now();
  let tFirst = null;
  let deltas = 0;
  let sawDone = false;
  try {
    const resp = await request("/v1/chat/completions", { method: "POST", body, signal, raw: true });
    out.started = true;
    for await (const ev of sseEvents(resp)) {
      if (ev.done) { sawDone = true; break; }
      if (ev.error) {
        out.error = typeof ev.error === "string" ? ev.error : ev.error.message || "the server reported an error";
        break;
      }
      if (ev.usage) out.usage = ev.usage;
      for (const choice of ev.choices || []) {
        if (choice.index !== 0 && choice.index !== undefined) continue;
        const piece = choice.delta && typeof choice.delta.content === "string" ? choice.delta.content : "";
        if (piece) {
          if (tFirst === null) tFirst = performance.now();
          deltas++;
          out.text += piece;
          onText(out.text);
        }
        if (choice.finish_reason) out.finish_reason = choice.finish_reason;
        for (const [k, v] of Object.entries(choice)) if (!KNOWN_CHOICE_KEYS.has(k)) out.extras[k] = v;
      }
    }
    if (!sawDone && !out.error && !out.finish_reason) {
      out.error = "The connection closed before the answer was complete.";
    }
  } catch (e) {
    if (e.name === "AbortError") out.stopped = true;
    else if (e instanceof ApiError) { out.error = e.message; out.errorStatus = e.status; }
    else out.error = `Connection lost: ${e.message || e}`;
  }
  const tEnd = performance.now();
  const completion = out.usage && Number.isFinite(out.usage.completion_tokens) ? out.usage.completion_tokens : deltas;
  out.timing = {
    deltas,   // text events seen: the token count when the stream ended before its usage report
    total_ms: Math.round(tEnd - t0),
    ttft_ms: tFirst === null ? null : Math.round(tFirst - t0),
    // Decode speed: tokens after the first over the time after the first (the first pays for the prompt).
    tokens_per_s: tFirst !== null && completion > 1 && tEnd > tFirst ? (completion - 1) / ((tEnd - tFirst) / 1000) : null,
  };
  return out;
}
