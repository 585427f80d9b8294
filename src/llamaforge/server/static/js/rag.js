// Documents for grounded answers, through the server's /v1/rag/collections routes when it has them. Servers
// without retrieval answer 404 there: the panel stays hidden and chats never send the `retrieval` field.

import { ApiError, request } from "./api.js";

const BASE = "/v1/rag/collections";
const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export class RagPanel {
  // els: {box, absent, collection, k, newName, files, upload, status}; onChange() when the choice changes
  constructor(els, onChange) {
    this.els = els;
    this.onChange = onChange;
    this.available = false;
    els.collection.addEventListener("change", () => onChange());
    els.k.addEventListener("change", () => onChange());
    els.upload.addEventListener("click", () => this.upload());
  }

  async detect() {
    try {
      const r = await request(BASE);
      this.available = true;
      this.fill(Array.isArray(r.data) ? r.data : []);
    } catch (e) {
      if (!(e instanceof ApiError) || ![404, 405, 501].includes(e.status)) {
        this.status(`Documents unavailable: ${e.message}`);
      }
      this.available = false;
    }
    this.els.box.hidden = !this.available;
    this.els.absent.hidden = this.available;
    return this.available;
  }

  fill(collections, keep = this.els.collection.value) {
    const sel = this.els.collection;
    sel.replaceChildren(new Option("none", ""));
    for (const c of collections) {
      const name = typeof c === "string" ? c : c && c.name;
      if (!name) continue;
      const extra = typeof c === "object" && Number.isFinite(c.documents) ? ` (${c.documents} docs)` : "";
      sel.append(new Option(name + extra, name));
    }
    if (keep && ![...sel.options].some((o) => o.value === keep)) sel.append(new Option(`${keep} (missing)`, keep));
    sel.value = keep || "";
  }

  // The chat's retrieval setting, or null.
  value() {
    const collection = this.els.collection.value;
    if (!collection) return null;
    const k = Math.max(1, Math.min(50, parseInt(this.els.k.value, 10) || 4));
    return { collection, k };
  }

  set(retrieval) {
    if (retrieval && retrieval.collection) {
      const sel = this.els.collection;
      if (![...sel.options].some((o) => o.value === retrieval.collection)) {
        sel.append(new Option(`${retrieval.collection} (missing)`, retrieval.collection));
      }
      sel.value = retrieval.collection;
      this.els.k.value = String(retrieval.k || 4);
    } else {
      this.els.collection.value = "";
    }
  }

  status(text) { this.els.status.textContent = text; }

  async upload() {
    const files = [...this.els.files.files];
    let name = (this.els.newName.value.trim() || this.els.collection.value).toLowerCase();
    if (!files.length) { this.status("Choose one or more files first."); return; }
    if (!name) { this.status("Pick a collection or type a name for a new one."); return; }
    if (!NAME.test(name)) {
      this.status("Collection names use letters, digits, '.', '_' and '-' (at most 64, starting with a letter or digit).");
      return;
    }
    this.els.upload.disabled = true;
    try {
      this.status(`Preparing collection ${name}…`);
      await request(BASE, { method: "POST", body: { name } });
      const problems = [];
      let chunks = 0;
      for (const [i, f] of files.entries()) {
        this.status(`Uploading ${f.name} (${i + 1}/${files.length})…`);
        try {
          const rep = await request(`${BASE}/${encodeURIComponent(name)}/documents?filename=${encodeURIComponent(f.name)}`,
            { method: "POST", data: f, contentType: "application/octet-stream" });   // raw bytes; the name says the type
          chunks += rep.chunks || 0;
          for (const err of rep.errors || []) problems.push(typeof err === "string" ? err
            : err && err.source ? `${err.source}: ${err.error}` : JSON.stringify(err));
        } catch (e) {
          problems.push(`${f.name}: ${e.message}`);
        }
      }
      const r = await request(BASE);
      this.fill(Array.isArray(r.data) ? r.data : [], name);
      this.els.newName.value = "";
      this.els.files.value = "";
      this.status(`${files.length - problems.length} of ${files.length} file(s) in ${name}, ${chunks} new chunks.`
        + (problems.length ? ` Problems: ${problems.join("; ")}` : ""));
      this.onChange();
    } catch (e) {
      this.status(`Upload failed: ${e.message}`);
    } finally {
      this.els.upload.disabled = false;
    }
  }
}
