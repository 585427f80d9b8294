// The message list: one <article data-role="user|assistant"> per message. User text is shown as text (never
// parsed as HTML); answers as sanitized markdown with their stats, sources and guard verdicts. Long
// conversations render newest first, older messages in the background, so opening one never freezes the page.

import { StreamingMarkdown, copyText, linkCitations, renderMarkdown } from "./markdown.js";

const FIRST_MS = 50;     // the newest messages are drawn in one go for up to this long...
const SLICE_MS = 12;     // ...older ones in slices this long, so input and scrolling never wait for them

export function formatStats(meta) {
  const parts = [];
  const u = meta.usage;
  const t = meta.timing;
  if (u && Number.isFinite(u.completion_tokens)) parts.push(`${u.completion_tokens} tokens`);
  else if (t && t.deltas > 0) parts.push(`≈${t.deltas} tokens`);
  if (t && Number.isFinite(t.tokens_per_s) && t.tokens_per_s > 0) parts.push(`${t.tokens_per_s.toFixed(1)} tok/s`);
  if (t && Number.isFinite(t.ttft_ms)) parts.push(`first token ${(t.ttft_ms / 1000).toFixed(2)} s`);
  if (u && Number.isFinite(u.prompt_tokens)) parts.push(`prompt ${u.prompt_tokens}`);
  return parts.join(" · ");
}

const FINISH_NOTES = {
  length: "Stopped at the token limit.",
  content_filter: "Blocked by a safety guard.",
};

function guardSummary(guard) {
  if (!guard || typeof guard !== "object") return null;
  const verdicts = [];
  const visit = (v, where) => {
    if (!v || typeof v !== "object") return;
    if (typeof v.safe === "boolean") {
      const cats = Array.isArray(v.categories) ? v.categories
        : v.categories && typeof v.categories === "object" ? Object.keys(v.categories) : [];
      verdicts.push(`${where ? where + ": " : ""}${v.safe ? "safe" : "unsafe"}${cats.length ? " (" + cats.join(", ") + ")" : ""}`);
    } else if (typeof v.verdict === "string") {   // the code scanner: block | warn | pass, with findings
      const n = Array.isArray(v.findings) ? v.findings.length : 0;
      verdicts.push(`${where ? where + ": " : ""}${v.verdict}${n ? ` (${n} finding${n > 1 ? "s" : ""})` : ""}`);
    } else {
      for (const [k, sub] of Object.entries(v)) if (sub && typeof sub === "object" && !Array.isArray(sub)) visit(sub, k);
    }
  };
  visit(guard, "");
  return verdicts.length ? verdicts.join("; ") : "verdict recorded";
}

function button(label, cls, onClick, aria) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = label;
  if (aria) b.setAttribute("aria-label", aria);
  b.addEventListener("click", onClick);
  return b;
}

function jsonAsMarkdown(text) {
  try {
    return "```json\n" + JSON.stringify(JSON.parse(text), null, 2) + "\n```";
  } catch {
    return "```json\n" + text + "\n```";
  }
}

export class MessageList {
  // handlers: onEdit(index, text), onRegenerate(index), canAct() -> bool
  constructor(container, emptyState, handlers) {
    this.el = container;
    this.emptyState = emptyState;
    this.handlers = handlers;
    this.renderToken = 0;
    this.idPrefix = "m";
  }

  nearBottom() { return this.el.scrollHeight - this.el.scrollTop - this.el.clientHeight < 120; }
  scrollToBottom() { this.el.scrollTop = this.el.scrollHeight; }

  clear() {
    this.renderToken++;
    this.el.replaceChildren(this.emptyState);
    this.emptyState.hidden = false;
  }

  // Render a conversation newest first: what fits in FIRST_MS at once, older messages prepended in SLICE_MS
  // slices between other work (a switch to another conversation stops it).
  async show(messages, convId) {
    const token = ++this.renderToken;
    this.idPrefix = `m-${convId}`;
    this.emptyState.hidden = messages.length > 0;
    this.el.replaceChildren(this.emptyState);
    let start = messages.length;
    let budget = FIRST_MS;
    let first = true;
    while (start > 0) {
      const t0 = performance.now();
      const slice = [];
      do {
        start--;
        slice.unshift(this.element(messages[start], start));
      } while (start > 0 && performance.now() - t0 < budget);
      const before = this.el.scrollHeight;
      this.el.insertBefore(this.fragment(slice), this.emptyState.nextSibling);
      if (first) {
        this.refreshActions();
        this.scrollToBottom();
        first = false;
      } else {
        this.el.scrollTop += this.el.scrollHeight - before;   // keep what the reader sees in place
      }
      budget = SLICE_MS;
      await new Promise((r) => setTimeout(r, 0));
      if (token !== this.renderToken) return;
    }
  }

  fragment(nodes) {
    const frag = document.createDocumentFragment();
    frag.append(...nodes);
    return frag;
  }

  append(msg, index) {
    this.emptyState.hidden = true;
    const stick = this.nearBottom();
    const el = this.element(msg, index);
    this.el.append(el);
    this.refreshActions();
    if (stick || msg.role === "user") this.scrollToBottom();
    return el;
  }

  // Remove message elements from `index` on (regenerate, edit-and-resend).
  truncate(index) {
    for (const el of [...this.el.querySelectorAll("article.msg")]) {
      if (Number(el.dataset.index) >= index) el.remove();
    }
    this.refreshActions();
  }

  // The answer being streamed: update(text) often, then finish(message) or discard().
  startAnswer(index, meta) {
    this.emptyState.hidden = true;
    const el = this.element({ role: "assistant", content: "", meta }, index, { streaming: true });
    this.el.append(el);
    this.scrollToBottom();
    let stick = true;   // follow the answer unless the reader scrolls away
    const md = new StreamingMarkdown(el.querySelector(".msg-body"));
    md.onRender = () => { if (stick) this.scrollToBottom(); };
    const onScroll = () => { stick = this.nearBottom(); };
    this.el.addEventListener("scroll", onScroll, { passive: true });
    const done = () => this.el.removeEventListener("scroll", onScroll);
    return {
      el,
      update: (text) => md.update(text),
      finish: (msg) => {
        done();
        const body = el.querySelector(".msg-body");
        if ((msg.meta || {}).json_mode) renderMarkdown(body, jsonAsMarkdown(msg.content));
        else md.finish(msg.content);
        const final = this.element(msg, index, { body });   // the streamed rendering is kept, not redone
        el.replaceWith(final);
        this.refreshActions();
        if (stick) this.scrollToBottom();
        return final;
      },
      discard: () => { done(); el.remove(); this.refreshActions(); },
    };
  }

  // Regenerate sits on the last answer only; nothing is actionable while an answer streams.
  refreshActions() {
    const all = [...this.el.querySelectorAll("article.msg")];
    const lastAssistant = all.filter((a) => a.dataset.role === "assistant").pop();
    const lastIsAnswer = all.length && all[all.length - 1] === lastAssistant;
    for (const a of all) {
      const regen = a.querySelector(".regenerate");
      if (regen) regen.hidden = !(a === lastAssistant && lastIsAnswer);
    }
  }

  setBusy(busy) {
    for (const b of this.el.querySelectorAll(".msg-actions button.needs-idle")) b.disabled = busy;
  }

  element(msg, index, { streaming = false, body: rendered = null } = {}) {
    const meta = msg.meta || {};
    const art = document.createElement("article");
    art.className = "msg";
    art.dataset.role = msg.role;
    art.dataset.index = String(index);
    if (streaming) art.setAttribute("aria-busy", "true");
    const who = document.createElement("div");
    who.className = "msg-who";
    who.textContent = msg.role === "user" ? "You" : `Assistant${meta.model ? " · " + meta.model : ""}`;
    const body = rendered || document.createElement("div");
    body.className = "msg-body";
    art.append(who, body);
    if (rendered) {
      body.classList.add("markdown");
      this.decorateAnswer(art, body, msg, index);
    } else if (msg.role === "user") {
      body.classList.add("plain");
      body.textContent = msg.content;   // user text is text, whatever it contains
    } else if (!streaming) {
      body.classList.add("markdown");
      renderMarkdown(body, meta.json_mode ? jsonAsMarkdown(msg.content) : msg.content);
      this.decorateAnswer(art, body, msg, index);
    } else {
      body.classList.add("markdown");
    }
    if (!streaming) art.append(this.footer(msg, index));
    return art;
  }

  decorateAnswer(art, body, msg, index) {
    const meta = msg.meta || {};
    const notes = [];
    if (meta.stopped) notes.push(["note", "Stopped."]);
    if (FINISH_NOTES[meta.finish_reason]) notes.push(["note", FINISH_NOTES[meta.finish_reason]]);
    if (meta.error) notes.push(["error", meta.error]);
    for (const [kind, text] of notes) {
      const p = document.createElement("p");
      p.className = kind === "error" ? "msg-error" : "msg-note";
      if (kind === "error") p.setAttribute("role", "alert");
      p.textContent = text;
      art.append(p);
    }
    if (meta.guard) art.append(this.guardBox(meta.guard, meta.finish_reason));
    const cites = Array.isArray(meta.citations) ? meta.citations.filter((c) => c && typeof c === "object") : [];
    if (cites.length) {
      const id = (n) => `${this.idPrefix}-${index}-src-${n}`;
      const numbers = new Set(cites.map((c, i) => Number(c.n ?? i + 1)));
      linkCitations(body, numbers, (n) => "#" + id(n));
      body.addEventListener("click", (ev) => {
        const a = ev.target.closest("a.cite-ref");
        if (!a) return;
        ev.preventDefault();
        const item = art.querySelector(`[data-source="${a.dataset.cite}"]`);
        if (item) { openSource(item); item.scrollIntoView({ block: "nearest" }); item.querySelector("button").focus(); }
      });
      art.append(this.sourcesBox(cites, id));
    }
  }

  guardBox(guard, finish) {
    const box = document.createElement("details");
    box.className = "msg-guard" + (finish === "content_filter" ? " blocked" : "");
    const sum = document.createElement("summary");
    sum.textContent = `Guard: ${guardSummary(guard)}`;
    const pre = document.createElement("pre");
    pre.textContent = JSON.stringify(guard, null, 2);
    box.append(sum, pre);
    return box;
  }

  sourcesBox(cites, id) {
    const wrap = document.createElement("section");
    wrap.className = "msg-sources";
    wrap.setAttribute("aria-label", "Sources");
    const h = document.createElement("h3");
    h.textContent = "Sources";
    const ol = document.createElement("ol");
    cites.forEach((c, i) => {
      const n = Number(c.n ?? i + 1);
      const li = document.createElement("li");
      li.id = id(n);
      li.dataset.source = String(n);
      const b = document.createElement("button");
      b.type = "button";
      b.className = "source-toggle";
      b.setAttribute("aria-expanded", "false");
      const where = [c.source, c.heading].filter((x) => typeof x === "string" && x).join(" › ");
      b.textContent = `[${n}] ${where || "source"}`;
      const text = document.createElement("blockquote");
      text.hidden = true;
      text.textContent = typeof c.text === "string" ? c.text : JSON.stringify(c);
      b.addEventListener("click", () => (text.hidden ? openSource(li) : closeSource(li)));
      li.append(b, text);
      ol.append(li);
    });
    wrap.append(h, ol);
    return wrap;
  }

  footer(msg, index) {
    const foot = document.createElement("div");
    foot.className = "msg-foot";
    const stats = document.createElement("span");
    stats.className = "msg-stats";
    if (msg.role === "assistant") stats.textContent = formatStats(msg.meta || {});
    const actions = document.createElement("span");
    actions.className = "msg-actions";
    if (msg.role === "user") {
      actions.append(button("Edit", "ghost small needs-idle", () => this.editMessage(index), "Edit message"));
    } else {
      actions.append(button("Copy", "ghost small", (ev) => copyText(msg.content, ev.currentTarget), "Copy answer"));
      const regen = button("Regenerate", "ghost small regenerate needs-idle", () => this.handlers.onRegenerate(index));
      actions.append(regen);
    }
    foot.append(stats, actions);
    return foot;
  }

  editMessage(index) {
    if (!this.handlers.canAct()) return;
    const art = this.el.querySelector(`article.msg[data-index="${index}"]`);
    if (!art || art.querySelector(".edit-form")) return;
    const body = art.querySelector(".msg-body");
    const original = body.textContent;
    const form = document.createElement("form");
    form.className = "edit-form";
    const area = document.createElement("textarea");
    area.value = original;
    area.setAttribute("aria-label", "Edit message");
    area.rows = Math.min(12, original.split("\n").length + 1);
    const save = document.createElement("button");
    save.type = "submit";
    save.className = "primary small";
    save.textContent = "Save and send";
    const cancel = button("Cancel", "ghost small", () => { form.remove(); body.hidden = false; });
    form.append(area, save, cancel);
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      if (!area.value.trim()) return;
      this.handlers.onEdit(index, area.value);
    });
    area.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); form.requestSubmit(); }
      if (ev.key === "Escape") cancel.click();
    });
    body.hidden = true;
    body.after(form);
    area.focus();
  }
}

function openSource(li) {
  li.querySelector("blockquote").hidden = false;
  li.querySelector("button").setAttribute("aria-expanded", "true");
  li.classList.add("open");
}

function closeSource(li) {
  li.querySelector("blockquote").hidden = true;
  li.querySelector("button").setAttribute("aria-expanded", "false");
  li.classList.remove("open");
}
