// Per-chat settings: the model (from GET /v1/models: loaded models and the store's), system prompt, sampling
// parameters, JSON mode and the document collection. Empty fields mean "the server's default".

import { request } from "./api.js";

const NUMBER_FIELDS = { temperature: parseFloat, top_p: parseFloat, max_tokens: (v) => parseInt(v, 10),
                        seed: (v) => parseInt(v, 10) };
const LAST_MODEL = "llamaforge.lastModel";

export class SettingsPanel {
  // els: {model, system, temperature, top_p, max_tokens, seed, json_mode, status}
  constructor(els, rag, onChange) {
    this.els = els;
    this.rag = rag;
    this.models = [];
    const changed = () => onChange();
    for (const name of ["model", "json_mode"]) els[name].addEventListener("change", changed);
    for (const name of ["system", ...Object.keys(NUMBER_FIELDS)]) els[name].addEventListener("input", changed);
  }

  async loadModels() {
    try {
      const r = await request("/v1/models");
      this.models = (r.data || []).map((m) => m.id).filter((id) => typeof id === "string");
    } catch (e) {
      this.status(`Could not list models: ${e.message}`);
      this.models = [];
    }
    const sel = this.els.model;
    const keep = sel.value;
    sel.replaceChildren(...this.models.map((id) => new Option(id, id)));
    if (!this.models.length) sel.append(new Option("no models", ""));
    this.setModel(keep || localStorage.getItem(LAST_MODEL));
    return this.models;
  }

  setModel(model) {
    const sel = this.els.model;
    if (model && ![...sel.options].some((o) => o.value === model)) sel.append(new Option(`${model} (unavailable)`, model));
    if (model) sel.value = model;
  }

  model() {
    const m = this.els.model.value || null;
    if (m) localStorage.setItem(LAST_MODEL, m);
    return m;
  }

  // {settings} as stored with the conversation.
  value() {
    const s = { system: this.els.system.value || null, json_mode: this.els.json_mode.checked };
    for (const [name, parse] of Object.entries(NUMBER_FIELDS)) {
      const raw = this.els[name].value.trim();
      const v = raw === "" ? null : parse(raw);
      s[name] = Number.isFinite(v) ? v : null;
    }
    s.retrieval = this.rag.available ? this.rag.value() : null;
    return s;
  }

  set(model, settings = {}) {
    if (model) this.setModel(model);
    this.els.system.value = settings.system || "";
    this.els.json_mode.checked = !!settings.json_mode;
    for (const name of Object.keys(NUMBER_FIELDS)) {
      const v = settings[name];
      this.els[name].value = v === null || v === undefined ? "" : String(v);
    }
    this.rag.set(settings.retrieval || null);
  }

  status(text) { this.els.status.textContent = text; }
}
