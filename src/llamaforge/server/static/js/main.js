// The chat page: wires the conversation list, the settings, the message list and the composer together.
// Conversations live on the server (/ui/api/conversations); answers stream from /v1/chat/completions.

import * as api from "./api.js";
import { MessageList } from "./messages.js";
import { RagPanel } from "./rag.js";
import { SettingsPanel } from "./settings.js";
import { Sidebar } from "./sidebar.js";
import { chatBody, streamAnswer } from "./stream.js";

const $ = (id) => document.getElementById(id);
const state = { conv: null, streaming: null, busy: false, opening: 0 };
const THEMES = ["auto", "light", "dark"];

// ------------------------------------------------------------------------------------------------ pieces
const view = new MessageList($("messages"), $("empty"), {
  onEdit: (index, text) => editAndResend(index, text),
  onRegenerate: (index) => regenerate(index),
  canAct: () => !state.busy && !state.streaming,
});
const sidebar = new Sidebar({ list: $("conversation-list"), search: $("search"), status: $("list-status") });
const rag = new RagPanel({ box: $("rag"), absent: $("rag-absent"), collection: $("rag-collection"), k: $("rag-k"),
                           newName: $("rag-new"), files: $("rag-files"), upload: $("rag-upload"),
                           status: $("rag-status") }, () => settingsChanged());
const settings = new SettingsPanel({ model: $("model"), system: $("system"), temperature: $("temperature"),
                                     top_p: $("top_p"), max_tokens: $("max_tokens"), seed: $("seed"),
                                     json_mode: $("json_mode"), status: $("settings-status") }, rag,
                                   () => settingsChanged());

// -------------------------------------------------------------------------------------------- the API key
api.onKeyNeeded((reason, hadKey) => new Promise((resolve) => {
  const dialog = $("key-dialog");
  $("key-error").textContent = hadKey ? reason : "";
  $("key-input").value = "";
  $("key-form").onsubmit = (ev) => {
    ev.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    dialog.close();
    $("forget-key").hidden = false;
    resolve(key);
  };
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}));
$("key-dialog").addEventListener("cancel", (ev) => ev.preventDefault());   // nothing works without the key
$("forget-key").hidden = !api.hasKey();
$("forget-key").addEventListener("click", () => { api.forgetKey(); location.reload(); });

// ------------------------------------------------------------------------------------------------ errors
function showError(message, retry = null) {
  const box = $("error");
  box.replaceChildren();
  const text = document.createElement("span");
  text.textContent = message;
  box.append(text);
  if (retry) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "small";
    b.textContent = "Retry";
    b.addEventListener("click", () => { clearError(); retry(); });
    box.append(b);
  }
  const close = document.createElement("button");
  close.type = "button";
  close.className = "ghost small";
  close.textContent = "Dismiss";
  close.addEventListener("click", clearError);
  box.append(close);
  box.hidden = false;
}

function clearError() { $("error").hidden = true; $("error").replaceChildren(); }

// ------------------------------------------------------------------------------------------ conversations
function setTitle(title) {
  $("chat-title").textContent = title || "New chat";
  document.title = title ? `${title} · llamaforge` : "llamaforge chat";
  $("rename").disabled = $("delete").disabled = !state.conv;
}

function titleFrom(text) {
  const line = text.split("\n").find((l) => l.trim()) || "New chat";
  const t = line.split(/\s+/).join(" ").trim();
  return t.length > 60 ? t.slice(0, 59) + "…" : t;
}

function newChat() {
  stopStreaming();
  state.opening++;
  state.conv = null;
  view.clear();
  setTitle(null);
  settings.set(null, {});
  sidebar.setActive(null);
  clearError();
  closeSidebarOnPhone();
  $("prompt").focus();
}

async function openConversation(id) {
  if (state.conv && state.conv.id === id) return;
  stopStreaming();
  const token = ++state.opening;
  let conv;
  try {
    conv = await api.conversations.get(id);
  } catch (e) {
    if (token !== state.opening) return;
    history.replaceState(null, "", "/ui");
    newChat();
    showError(e.status === 404 ? "That conversation does not exist (or belongs to another key)." : e.message);
    return;
  }
  if (token !== state.opening) return;
  state.conv = conv;
  clearError();
  setTitle(conv.title);
  settings.set(conv.model, conv.settings || {});
  sidebar.setActive(conv.id);
  closeSidebarOnPhone();
  await view.show(conv.messages, conv.id);
}

function route() {
  const m = /^#\/c\/([0-9a-f]{32})$/.exec(location.hash);
  if (m) openConversation(m[1]); else if (state.conv) newChat();
}

let saveTimer = null;
function settingsChanged() {
  if (!state.conv) return;
  clearTimeout(saveTimer);
  const conv = state.conv;
  saveTimer = setTimeout(async () => {
    try {
      const updated = await api.conversations.update(conv.id, { model: settings.model(), settings: settings.value() });
      conv.model = updated.model;
      conv.settings = updated.settings;
      settings.status("");
    } catch (e) {
      settings.status(`Settings not saved: ${e.message}`);
    }
  }, 400);
}

// ------------------------------------------------------------------------------------------------ sending
function setStreaming(on) {
  document.body.dataset.streaming = String(on);   // for styles, scripts and tests
  $("send").hidden = on;
  $("stop").hidden = !on;
  view.setBusy(on);
}

function stopStreaming() {
  if (state.streaming) state.streaming.controller.abort();
}

async function sendMessage() {
  const box = $("prompt");
  const text = box.value;
  if (!text.trim() || state.busy || state.streaming) return;
  const model = settings.model();
  if (!model) { showError("This server has no model to chat with."); return; }
  clearError();
  state.busy = true;
  const message = { role: "user", content: text };
  try {
    if (!state.conv) {
      const conv = await api.conversations.create({ title: titleFrom(text), model, settings: settings.value(),
                                                    messages: [message] });
      state.conv = conv;
      history.replaceState(null, "", `#/c/${conv.id}`);
      setTitle(conv.title);
      sidebar.setActive(conv.id);
      view.clear();
      view.idPrefix = `m-${conv.id}`;
      view.append(conv.messages[0], 0);
    } else {
      const r = await api.conversations.write(state.conv.id, [message]);
      state.conv.messages.push(r.written[0]);
      view.append(r.written[0], state.conv.messages.length - 1);
    }
  } catch (e) {
    state.busy = false;
    showError(`The message was not sent: ${e.message}`);   // it stays in the box
    return;
  }
  box.value = "";
  autosize();
  sidebar.refresh();
  state.busy = false;
  await generate();
}

async function generate() {
  const conv = state.conv;
  if (!conv || state.streaming) return;
  const index = conv.messages.length;
  const model = settings.model();
  const s = settings.value();
  const controller = new AbortController();
  state.streaming = { controller, convId: conv.id };
  setStreaming(true);
  const answer = view.startAnswer(index, { model, json_mode: s.json_mode });
  const r = await streamAnswer(chatBody(model, conv.messages, s, { retrieval: rag.available }), controller.signal,
                               (text) => answer.update(text));
  state.streaming = null;
  setStreaming(false);
  const current = state.conv === conv;
  if (!r.text && (r.stopped || r.error)) {
    answer.discard();
    if (r.error && current) showError(r.error, () => generate());
    return;
  }
  const meta = { ...r.extras, model, finish_reason: r.finish_reason, usage: r.usage, timing: r.timing };
  if (s.json_mode) meta.json_mode = true;
  if (r.stopped) meta.stopped = true;
  if (r.error) meta.error = r.error;
  let saved = { role: "assistant", content: r.text, meta };
  try {
    const w = await api.conversations.write(conv.id, [saved]);
    saved = w.written[0];
    conv.messages.push(saved);
  } catch (e) {
    if (current) showError(`The answer is shown but was not saved: ${e.message}`);
  }
  if (current) answer.finish(saved);
  sidebar.refresh();
}

async function regenerate(index) {
  const conv = state.conv;
  if (!conv || state.busy || state.streaming) return;
  state.busy = true;
  try {
    await api.conversations.write(conv.id, [], index);
  } catch (e) {
    showError(`Could not regenerate: ${e.message}`);
    return;
  } finally {
    state.busy = false;
  }
  conv.messages.length = index;
  view.truncate(index);
  clearError();
  await generate();
}

async function editAndResend(index, text) {
  const conv = state.conv;
  if (!conv || state.busy || state.streaming) return;
  state.busy = true;
  let written;
  try {
    written = (await api.conversations.write(conv.id, [{ role: "user", content: text }], index)).written[0];
  } catch (e) {
    showError(`The edit was not saved: ${e.message}`);
    return;
  } finally {
    state.busy = false;
  }
  conv.messages.length = index;
  conv.messages.push(written);
  view.truncate(index);
  view.append(written, index);
  clearError();
  await generate();
}

// ----------------------------------------------------------------------------------------- rename, delete
$("rename").addEventListener("click", () => {
  if (!state.conv) return;
  $("rename-input").value = state.conv.title;
  $("rename-form").hidden = false;
  $("chat-title").hidden = true;
  $("rename-input").select();
});
function endRename() { $("rename-form").hidden = true; $("chat-title").hidden = false; }
$("rename-cancel").addEventListener("click", endRename);
$("rename-input").addEventListener("keydown", (ev) => { if (ev.key === "Escape") endRename(); });
$("rename-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const conv = state.conv;
  const title = $("rename-input").value.trim();
  if (!conv || !title) return;
  try {
    const updated = await api.conversations.update(conv.id, { title });
    conv.title = updated.title;
    setTitle(updated.title);
    endRename();
    sidebar.refresh();
  } catch (e) {
    showError(`Could not rename: ${e.message}`);
  }
});

let deleteArmed = null;
$("delete").addEventListener("click", async () => {
  const conv = state.conv;
  if (!conv) return;
  const b = $("delete");
  if (deleteArmed !== conv.id) {   // a second click within a few seconds confirms
    deleteArmed = conv.id;
    b.textContent = "Confirm delete";
    setTimeout(() => { deleteArmed = null; b.textContent = "Delete"; }, 4000);
    return;
  }
  deleteArmed = null;
  b.textContent = "Delete";
  try {
    await api.conversations.remove(conv.id);
  } catch (e) {
    showError(`Could not delete: ${e.message}`);
    return;
  }
  history.pushState(null, "", "/ui");
  newChat();
  sidebar.refresh();
});

// ------------------------------------------------------------------------------------------ the composer
function autosize() {
  const box = $("prompt");
  box.style.height = "auto";
  box.style.height = Math.min(box.scrollHeight, 240) + "px";
}

$("composer").addEventListener("submit", (ev) => { ev.preventDefault(); sendMessage(); });
$("prompt").addEventListener("input", autosize);
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing && ev.keyCode !== 229) {
    ev.preventDefault();
    if (!state.streaming) sendMessage();
  } else if (ev.key === "Escape" && state.streaming) {
    stopStreaming();
  }
});
$("stop").addEventListener("click", stopStreaming);
$("new-chat").addEventListener("click", () => { history.pushState(null, "", "/ui"); newChat(); });
window.addEventListener("hashchange", route);
window.addEventListener("popstate", route);

// ------------------------------------------------------------------------------------ theme, small screens
function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  $("theme").textContent = `Theme: ${theme}`;
  $("theme").setAttribute("aria-label", `Theme: ${theme === "auto" ? "automatic" : theme}`);
}
applyTheme(THEMES.includes(localStorage.getItem("llamaforge.theme")) ? localStorage.getItem("llamaforge.theme") : "auto");
$("theme").addEventListener("click", () => {
  const next = THEMES[(THEMES.indexOf(document.documentElement.dataset.theme) + 1) % THEMES.length];
  localStorage.setItem("llamaforge.theme", next);
  applyTheme(next);
});

function closeSidebarOnPhone() {
  $("app").classList.remove("sidebar-open");
  $("toggle-sidebar").setAttribute("aria-expanded", "false");
}
$("toggle-sidebar").addEventListener("click", () => {
  const open = $("app").classList.toggle("sidebar-open");
  $("toggle-sidebar").setAttribute("aria-expanded", String(open));
});
$("conversation-list").addEventListener("click", (ev) => { if (ev.target.closest("a")) closeSidebarOnPhone(); });
$("toggle-settings").addEventListener("click", () => {
  const box = $("settings");
  box.hidden = !box.hidden;
  $("toggle-settings").setAttribute("aria-expanded", String(!box.hidden));
});

// ------------------------------------------------------------------------------------------------ start
async function start() {
  setTitle(null);
  await Promise.all([settings.loadModels(), rag.detect()]);
  await sidebar.refresh();
  route();
  document.body.dataset.ready = "true";   // tests and scripts wait for this
}
start();
