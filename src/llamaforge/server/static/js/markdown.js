// Model text -> sanitized, highlighted HTML. Markdown is parsed by marked, the HTML it makes is cleaned by
// DOMPurify before it touches the page, code is highlighted by highlight.js on the cleaned DOM. While an answer
// streams, finished top-level blocks are rendered once and kept; only the last, still-growing block is
// re-rendered (at most once per frame), so a long answer costs the same per token as a short one.

import { Marked } from "../vendor/marked.esm.js";
import DOMPurify from "../vendor/purify.es.mjs";
import hljs from "../vendor/highlight.min.js";

const LIVE_HIGHLIGHT_LIMIT = 6000;   // characters of a still-streaming code block worth highlighting per frame
const AUTO_DETECT_LIMIT = 20000;     // language auto-detection tries every grammar: only for modest blocks

const REFERENCE_DEF = /^ {0,3}\[[^\]\n]+\]:/m;   // [label]: url

const marked = new Marked({ gfm: true, breaks: false, async: false });
marked.use({
  renderer: {
    // Never fetch what a model points at: an image becomes a link the reader may follow.
    image({ href, text }) {
      const label = escapeHtml(text || href || "image");
      return href ? `<a href="${escapeHtml(href)}">[image: ${label}]</a>` : `[image: ${label}]`;
    },
  },
});

const PURIFY = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "option", "dialog", "iframe",
                "object", "embed", "img", "video", "audio", "source", "picture", "svg", "math", "base", "link",
                "meta"],
  FORBID_ATTR: ["style", "id", "name", "srcset", "formaction", "autofocus", "tabindex"],
  ALLOW_DATA_ATTR: false,
  RETURN_DOM_FRAGMENT: true,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.hasAttribute && node.hasAttribute("class")) {
    // Only the language tag of code blocks survives: model text must not borrow the page's own styles.
    const keep = [...node.classList].filter((c) => /^language-[\w+#.-]{1,40}$/.test(c));
    if (keep.length) node.setAttribute("class", keep.join(" ")); else node.removeAttribute("class");
  }
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

export function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
    "'": "&#39;" })[c]);
}

function normalize(text) { return text.replace(/\r\n?/g, "\n"); }

// A sanitized fragment for markdown source (or for marked tokens).
function toFragment(source) {
  const html = typeof source === "string" ? marked.parse(source) : marked.parser(source);
  return DOMPurify.sanitize(html, PURIFY);
}

// Highlight code blocks and give each a header with its language and a Copy button.
export function decorateCode(root, { live = false } = {}) {
  for (const pre of root.querySelectorAll("pre")) {
    if (pre.closest(".code-block")) continue;
    const code = pre.querySelector("code") || pre;
    const lang = ([...code.classList].find((c) => c.startsWith("language-")) || "").slice(9);
    const text = code.textContent;
    const limit = live ? LIVE_HIGHLIGHT_LIMIT : Infinity;
    if (text.length <= limit) {
      try {
        if (lang && hljs.getLanguage(lang)) {
          code.innerHTML = hljs.highlight(text, { language: lang, ignoreIllegals: true }).value;
        } else if (!lang && !live && text.length <= AUTO_DETECT_LIMIT) {
          code.innerHTML = hljs.highlightAuto(text).value;   // highlight.js escapes the text it wraps
        }
        code.classList.add("hljs");
      } catch { /* leave the plain text */ }
    }
    const box = document.createElement("div");
    box.className = "code-block";
    const head = document.createElement("div");
    head.className = "code-head";
    const label = document.createElement("span");
    label.textContent = lang || "code";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "ghost small copy-code";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", `Copy ${lang || ""} code`.replace("  ", " "));
    copy.addEventListener("click", () => copyText(text, copy));
    head.append(label, copy);
    pre.replaceWith(box);
    box.append(head, pre);
  }
}

export async function copyText(text, button) {
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch {
    // Not a secure context (a LAN address over http): the old way.
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.append(area);
    area.select();
    try { ok = document.execCommand("copy"); } catch { ok = false; }
    area.remove();
  }
  if (button) {
    const before = button.textContent;
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { button.textContent = before; }, 1500);
  }
  return ok;
}

// Turn [n] markers in text (not in code or links) into links to the answer's sources.
export function linkCitations(root, numbers, hrefFor) {
  if (!numbers.size) return;
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT, {
    acceptNode: (n) => (n.parentElement.closest("pre, code, a") ? NodeFilter.FILTER_REJECT
      : /\[\d{1,3}\]/.test(n.nodeValue) ? NodeFilter.FILTER_ACCEPT : NodeFilter.FILTER_SKIP),
  });
  const nodes = [];
  while (walker.nextNode()) nodes.push(walker.currentNode);
  for (const node of nodes) {
    const frag = document.createDocumentFragment();
    let last = 0;
    const text = node.nodeValue;
    for (const m of text.matchAll(/\[(\d{1,3})\]/g)) {
      const n = Number(m[1]);
      if (!numbers.has(n)) continue;
      frag.append(text.slice(last, m.index));
      const a = document.createElement("a");
      a.className = "cite-ref";
      a.href = hrefFor(n);
      a.textContent = `[${n}]`;
      a.dataset.cite = String(n);
      a.setAttribute("aria-label", `source ${n}`);
      frag.append(a);
      last = m.index + m[0].length;
    }
    if (last === 0) continue;
    frag.append(text.slice(last));
    node.replaceWith(frag);
  }
}

// Render a whole text at once (stored answers, the end of a stream).
export function renderMarkdown(el, text) {
  el.replaceChildren(toFragment(normalize(text)));
  decorateCode(el);
}

// An answer that grows while it streams: call update(text) as often as you like, finish(text) once.
export class StreamingMarkdown {
  constructor(el) {
    this.el = el;
    this.frozen = document.createElement("div");
    this.live = document.createElement("div");
    el.replaceChildren(this.frozen, this.live);
    this.frozenLen = 0;
    this.frozenSource = "";   // the text behind this.frozen (finish() checks the final text still starts so)
    this.text = "";
    this.scheduled = false;
    this.delay = 0;          // grows when a render is slow, so a huge block cannot starve the page
    this.onRender = null;
  }

  update(text) {
    this.text = normalize(text);
    if (this.scheduled || this.finished) return;
    this.scheduled = true;
    const run = () => requestAnimationFrame(() => { this.scheduled = false; this.renderNow(); });
    if (this.delay > 0) setTimeout(run, this.delay); else run();
  }

  renderNow() {
    if (this.finished) return;
    const t0 = performance.now();
    let rest = this.text.slice(this.frozenLen);
    const tokens = marked.lexer(rest);
    let last = tokens.length - 1;
    while (last >= 0 && tokens[last].type === "space") last--;
    if (last > 0) {
      // Every top-level block before the last non-blank one is complete: render it once, for good.
      const done = tokens.slice(0, last);
      const raw = done.map((t) => t.raw).join("");
      if (rest.startsWith(raw) && !done.some((t) => t.type === "def")) {
        done.links = tokens.links;
        const frag = toFragment(done);
        const holder = document.createElement("div");
        holder.append(frag);
        decorateCode(holder);
        this.frozen.append(...holder.childNodes);
        this.frozenLen += raw.length;
        this.frozenSource += raw;
        rest = rest.slice(raw.length);
      }
    }
    this.live.replaceChildren(toFragment(rest));
    decorateCode(this.live, { live: true });
    const took = performance.now() - t0;
    this.delay = took > 12 ? Math.min(1000, took * 4) : 0;
    if (this.onRender) this.onRender();
  }

  // The last render. Finished blocks stay as they are (a long answer is not redone at its end), unless the text
  // defines reference links, which can change blocks rendered before the definition arrived.
  finish(text) {
    this.text = normalize(text);
    if (REFERENCE_DEF.test(this.text) || !this.text.startsWith(this.frozenSource)) {
      this.finished = true;   // a frame still pending does nothing
      renderMarkdown(this.el, this.text);
      return;
    }
    const rest = this.text.slice(this.frozenLen);
    this.live.replaceChildren(toFragment(rest));
    decorateCode(this.live);
    this.finished = true;
  }
}
