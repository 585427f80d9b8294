// HTTP to this server: the API key (asked for once, kept in sessionStorage), error messages in either of the
// server's error shapes, and the server-sent events of a streamed chat completion.

const KEY_NAME = "llamaforge.apiKey";

export class ApiError extends Error {
  constructor(message, status = 0, param = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.param = param;
  }
}

let askForKey = null;   // (reason, hadKey) => Promise<string>, set by the page
let pendingAsk = null;  // several requests answered 401 at once share one prompt

export function onKeyNeeded(fn) { askForKey = fn; }
export function hasKey() { return !!sessionStorage.getItem(KEY_NAME); }
export function forgetKey() { sessionStorage.removeItem(KEY_NAME); }

function authHeaders() {
  const key = sessionStorage.getItem(KEY_NAME);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function newKey(reason) {
  if (!askForKey) throw new ApiError(reason, 401);
  if (!pendingAsk) {
    const hadKey = hasKey();
    pendingAsk = askForKey(reason, hadKey).then((key) => {
      sessionStorage.setItem(KEY_NAME, key);
    }).finally(() => { pendingAsk = null; });
  }
  return pendingAsk;
}

// The message of an error response: {"error": {"message": ...}} (OpenAI routes) or {"error": "..."}.
export async function errorMessage(resp) {
  let text = "";
  try { text = await resp.text(); } catch { /* body unreadable */ }
  try {
    const body = JSON.parse(text);
    const err = body && body.error;
    if (typeof err === "string") return { message: err, param: null };
    if (err && typeof err.message === "string") return { message: err.message, param: err.param ?? null };
  } catch { /* not JSON */ }
  const detail = text.trim().slice(0, 300);
  return { message: `${resp.status} ${resp.statusText || "error"}${detail ? ": " + detail : ""}`, param: null };
}

// fetch with the key; a 401 asks for a key and retries. Returns parsed JSON, or the Response when `raw`.
// `data` sends a Blob/File as the body, with `contentType`.
export async function request(path, { method = "GET", body, signal, raw = false, data, contentType } = {}) {
  for (let attempt = 0; attempt < 5; attempt++) {
    const headers = { ...authHeaders() };
    let payload;
    if (data !== undefined) { payload = data; headers["Content-Type"] = contentType || "application/octet-stream"; }
    else if (body !== undefined) { headers["Content-Type"] = "application/json"; payload = JSON.stringify(body); }
    let resp;
    try {
      resp = await fetch(path, { method, headers, body: payload, signal, cache: "no-store" });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(`could not reach the server (${e.message || e})`, 0);
    }
    if (resp.status === 401) {
      const { message } = await errorMessage(resp);
      await newKey(message);
      continue;
    }
    if (!resp.ok) {
      const { message, param } = await errorMessage(resp);
      throw new ApiError(message, resp.status, param);
    }
    if (raw) return resp;
    return resp.status === 204 ? null : resp.json();
  }
  throw new ApiError("the API key was refused", 401);
}

// The JSON events of a text/event-stream body until `data: [DONE]`. Throws when the connection breaks.
export async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") { yield { done: true }; return; }
        let obj;
        try { obj = JSON.parse(data); } catch { throw new ApiError("the server sent an unreadable event", 0); }
        yield obj;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

// -- the conversation store (/ui/api/conversations)
const BASE = "/ui/api/conversations";
export const conversations = {
  list: (q) => request(BASE + (q ? `?q=${encodeURIComponent(q)}` : "")).then((r) => r.conversations),
  get: (id) => request(`${BASE}/${encodeURIComponent(id)}`),
  create: (body) => request(BASE, { method: "POST", body }),
  update: (id, body) => request(`${BASE}/${encodeURIComponent(id)}`, { method: "PATCH", body }),
  remove: (id) => request(`${BASE}/${encodeURIComponent(id)}`, { method: "DELETE" }),
  write: (id, messages, replaceFrom = null) => request(`${BASE}/${encodeURIComponent(id)}/messages`, {
    method: "POST", body: replaceFrom === null ? { messages } : { messages, replace_from: replaceFrom },
  }),
};
