// The conversation list: a nav named "Conversations" with one link per conversation (#/c/ID, so a reload or a
// bookmark reopens it), newest first, filtered by the search box on the server.

import { conversations } from "./api.js";

export class Sidebar {
  // els: {list, search, status}
  constructor(els) {
    this.els = els;
    this.activeId = null;
    this.query = "";
    this.seq = 0;
    let timer = null;
    els.search.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(() => { this.query = els.search.value.trim(); this.refresh(); }, 250);
    });
    els.search.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape") { els.search.value = ""; this.query = ""; this.refresh(); }
    });
  }

  async refresh() {
    const seq = ++this.seq;   // an older answer arriving late must not overwrite a newer one
    let rows;
    try {
      rows = await conversations.list(this.query);
    } catch (e) {
      if (seq === this.seq) this.els.status.textContent = `Could not load conversations: ${e.message}`;
      return;
    }
    if (seq !== this.seq) return;
    this.els.status.textContent = rows.length ? "" : this.query ? "No conversation matches." : "No conversations yet.";
    const items = rows.map((c) => {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = `#/c/${c.id}`;
      a.className = "conversation-link";
      a.textContent = c.title || "Untitled";
      a.dataset.id = c.id;
      if (c.id === this.activeId) a.setAttribute("aria-current", "page");
      li.append(a);
      if (c.match) {
        const m = document.createElement("div");
        m.className = "match muted small";
        m.textContent = c.match;
        li.append(m);
      }
      return li;
    });
    this.els.list.replaceChildren(...items);
  }

  setActive(id) {
    this.activeId = id;
    for (const a of this.els.list.querySelectorAll("a.conversation-link")) {
      if (a.dataset.id === id) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
    }
  }
}
