"""The web UI's conversations: one SQLite file under `$LLAMAFORGE_HOME/webui/`, rows owned per API key.

    store = ConversationStore()                       # $LLAMAFORGE_HOME/webui/conversations.sqlite3
    owner = store.owner_for(api_key)                  # "local" without keys, else an HMAC of the key
    c = store.create(owner, {"title": "Trip", "model": "smollm2", "settings": {"temperature": 0.7}})
    store.write_messages(owner, c["id"], [{"role": "user", "content": "Hi"}])
    store.list(owner, query="trip")                   # newest first; the query matches titles and message text

The key itself is never stored: an owner is HMAC-SHA256(key) under a random secret kept in the database, so
the file alone does not give keys away, and a guessed owner id is useless without the key. Every read and
write is filtered by owner: another key's conversation answers "not found", exactly as a missing one does.
Writes are single SQLite transactions (WAL journal), so a crash leaves the previous state or the new one.
Every field is checked (type, size) before it reaches the database; errors name the field.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import re
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from ..errors import InvalidRequestError, LlamaforgeError
from .._fs import loads_json

SCHEMA_VERSION = 1
LOCAL_OWNER = "local"          # the owner of every conversation when the server runs without API keys

MAX_TITLE = 200                # characters
MAX_MODEL_NAME = 256
MAX_SYSTEM = 32_000
MAX_CONTENT = 1_000_000        # characters of one message
MAX_META_BYTES = 256 * 1024    # JSON bytes of one message's metadata (stats, citations, guard verdicts)
MAX_MESSAGES = 10_000          # per conversation
MAX_CONVERSATION_CHARS = 32_000_000
MAX_CONVERSATIONS = 10_000     # per owner
MAX_WRITE = 100                # messages in one write
MAX_QUERY = 200
MAX_LIST = 500
ROLES = ("user", "assistant")
_ID = re.compile(r"^[0-9a-f]{32}$")

# Per-chat settings: name -> checker. Unknown names are refused (the page must not lose settings silently).
_SETTINGS_DOC = "system, temperature, top_p, max_tokens, seed, json_mode, retrieval"


class ConversationStoreError(LlamaforgeError):
    """The conversation database cannot be opened or used (corrupt file, newer schema, disk error)."""


class ConversationNotFoundError(LlamaforgeError):
    """No conversation with that id belongs to the caller."""

    def __init__(self, conversation_id: str):
        self.conversation_id = conversation_id
        super().__init__(f"conversation {conversation_id!r} not found")


def default_path() -> Path:
    """`$LLAMAFORGE_HOME/webui/conversations.sqlite3` (read at call time, so tests can point it elsewhere)."""
    from ..store import home
    return home() / "webui" / "conversations.sqlite3"


# ------------------------------------------------------------------------------------------------ validation
def _text(value: Any, field: str, limit: int, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"'{field}' must be a string", field)
    if len(value) > limit:
        raise InvalidRequestError(f"'{field}' is longer than {limit} characters", field)
    if not allow_empty and not value.strip():
        raise InvalidRequestError(f"'{field}' must not be empty", field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(f"'{field}' is not valid Unicode (lone surrogate)", field) from None
    if "\x00" in value:
        raise InvalidRequestError(f"'{field}' must not contain NUL characters", field)
    return value


def _number(value: Any, field: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(f"'{field}' must be a finite number or null", field)
    if value > high or value < low or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise InvalidRequestError(f"'{field}' must be in {bound}", field)
    return float(value)


def _integer(value: Any, field: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"'{field}' must be an integer or null", field)
    if not low <= value <= high:
        raise InvalidRequestError(f"'{field}' must be between {low} and {high}", field)
    return value


def _object(value: Any, field: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidRequestError(f"'{field}' must be an object", field)
    return value


def check_settings(value: Any, field: str = "settings") -> dict:
    """The per-chat settings the page sends: system prompt, sampling, JSON mode, retrieval. Returns a clean copy."""
    value = _object(value, field)
    out: dict[str, Any] = {}
    for name, v in value.items():
        f = f"{field}.{name}"
        if name == "system":
            out[name] = _text(v, f, MAX_SYSTEM) if v is not None else None
        elif name == "temperature":
            out[name] = _number(v, f, 0.0, 2.0)
        elif name == "top_p":
            out[name] = _number(v, f, 0.0, 1.0, low_open=True)
        elif name == "max_tokens":
            out[name] = _integer(v, f, 1, 1 << 20)
        elif name == "seed":
            out[name] = _integer(v, f, -(1 << 63), (1 << 64) - 1)
        elif name == "json_mode":
            if not isinstance(v, bool):
                raise InvalidRequestError(f"'{f}' must be true or false", f)
            out[name] = v
        elif name == "retrieval":
            out[name] = _retrieval(v, f)
        else:
            raise InvalidRequestError(f"unknown setting '{f}' (known: {_SETTINGS_DOC})", f)
    return out


def _retrieval(v: Any, field: str) -> dict | None:
    if v is None:
        return None
    v = _object(v, field)
    unknown = set(v) - {"collection", "k"}
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidRequestError(f"unknown field '{field}.{name}' (known: collection, k)", f"{field}.{name}")
    return {"collection": _text(v.get("collection"), f"{field}.collection", 128, allow_empty=False),
            "k": _integer(v.get("k", 4), f"{field}.k", 1, 50)}


def _meta(value: Any, field: str) -> str:
    if value is None:
        return "{}"
    _object(value, field)
    try:
        raw = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        size = len(raw.encode("utf-8"))
    except (ValueError, UnicodeEncodeError):
        raise InvalidRequestError(f"'{field}' must be plain JSON (finite numbers, valid Unicode)", field) from None
    if size > MAX_META_BYTES:
        raise InvalidRequestError(f"'{field}' is larger than {MAX_META_BYTES} bytes", field)
    return raw


def _message(value: Any, field: str) -> tuple[str, str, str]:
    value = _object(value, field)
    unknown = set(value) - {"role", "content", "meta"}
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidRequestError(f"unknown field '{field}.{name}' (known: role, content, meta)", f"{field}.{name}")
    role = value.get("role")
    if role not in ROLES:
        raise InvalidRequestError(f"'{field}.role' must be one of {', '.join(ROLES)}", f"{field}.role")
    return role, _text(value.get("content"), f"{field}.content", MAX_CONTENT), _meta(value.get("meta"),
                                                                                       f"{field}.meta")


def _fields(value: Any, *, creating: bool) -> dict:
    """Conversation fields of a create/update body: title, model, settings."""
    value = _object(value, "body")
    out: dict[str, Any] = {}
    for name, v in value.items():
        if name == "title":
            out["title"] = " ".join(_text(v, "title", MAX_TITLE).split())
        elif name == "model":
            out["model"] = _text(v, "model", MAX_MODEL_NAME) if v is not None else None
        elif name == "settings":
            out["settings"] = json.dumps(check_settings(v), separators=(",", ":"))
        elif name == "messages" and creating:
            continue  # checked by the caller, written in the same transaction
        else:
            known = "title, model, settings" + (", messages" if creating else "")
            raise InvalidRequestError(f"unknown field '{name}' (known: {known})", name)
    return out


def _fold(text: str | None) -> str:
    return (text or "").casefold()


# ----------------------------------------------------------------------------------------------------- store
_SCHEMA_V1 = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS conversations (id TEXT PRIMARY KEY, owner TEXT NOT NULL, title TEXT NOT NULL, "
    "model TEXT, settings TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL, updated REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS conversations_by_owner ON conversations (owner, updated)",
    "CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "conversation TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE, position INTEGER NOT NULL, "
    "role TEXT NOT NULL, content TEXT NOT NULL, meta TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL, "
    "UNIQUE (conversation, position))",
)


class ConversationStore:
    """Conversations and their messages in one SQLite database. Thread-safe: one short connection per call."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_path()
        self._secret: bytes | None = None
        self._init_lock = threading.Lock()
        self._ready = False

    # -- connections
    @contextlib.contextmanager
    def _connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        self._ensure_schema()
        try:
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        except sqlite3.Error as e:
            raise ConversationStoreError(f"cannot open the conversation database {self.path}: {e}") from None
        try:
            conn.row_factory = sqlite3.Row
            conn.create_function("lf_fold", 1, _fold, deterministic=True)
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise ConversationStoreError(f"conversation database error ({self.path}): {e}") from None
        finally:
            conn.close()

    def _ensure_schema(self) -> None:
        if self._ready:
            return
        with self._init_lock:
            if self._ready:
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            except (OSError, sqlite3.Error) as e:
                raise ConversationStoreError(f"cannot create the conversation database {self.path}: {e}") from None
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("BEGIN IMMEDIATE")
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    conn.execute("ROLLBACK")
                    raise ConversationStoreError(
                        f"{self.path} was written by a newer llamaforge (schema {version}, this one knows "
                        f"{SCHEMA_VERSION}); upgrade llamaforge or move the file away")
                if version < 1:
                    for statement in _SCHEMA_V1:   # one by one: executescript would commit mid-transaction
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                row = conn.execute("SELECT value FROM meta WHERE key='owner_secret'").fetchone()
                if row is None:
                    secret = secrets.token_bytes(32)
                    conn.execute("INSERT INTO meta (key, value) VALUES ('owner_secret', ?)", (secret,))
                else:
                    secret = bytes(row[0])
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                raise ConversationStoreError(f"the conversation database {self.path} is unusable: {e}") from None
            finally:
                conn.close()
            self._secret, self._ready = secret, True

    # -- owners
    def owner_for(self, api_key: str | bytes | None) -> str:
        """The owner id of a caller: LOCAL_OWNER without a key, else HMAC-SHA256 of the key's UTF-8 bytes (hex)."""
        if not api_key:
            return LOCAL_OWNER
        self._ensure_schema()
        raw = api_key if isinstance(api_key, bytes) else api_key.encode("utf-8", "surrogatepass")
        return "key:" + hmac.new(self._secret, raw, hashlib.sha256).hexdigest()

    # -- reads
    def list(self, owner: str, query: str | None = None, limit: int = 200) -> list[dict]:
        """The owner's conversations, most recently updated first; `query` keeps those whose title or any
        message contains it (case-insensitive), each with a `match` snippet."""
        limit = _integer(limit, "limit", 1, MAX_LIST)
        q = _fold(_text(query, "q", MAX_QUERY).strip()) if query is not None else ""
        with self._connect() as conn:
            if not q:
                rows = conn.execute(
                    "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation=c.id) AS n FROM "
                    "conversations c WHERE owner=? ORDER BY updated DESC, id LIMIT ?", (owner, limit)).fetchall()
                return [self._summary(r) for r in rows]
            rows = conn.execute(
                "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation=c.id) AS n, "
                "(SELECT m.content FROM messages m WHERE m.conversation=c.id AND instr(lf_fold(m.content), ?) > 0 "
                " ORDER BY m.position LIMIT 1) AS hit FROM conversations c WHERE owner=? "
                "AND (instr(lf_fold(title), ?) > 0 OR hit IS NOT NULL) ORDER BY updated DESC, id LIMIT ?",
                (q, owner, q, limit)).fetchall()
            out = []
            for r in rows:
                s = self._summary(r)
                s["match"] = _snippet(r["hit"], q) if r["hit"] is not None else _snippet(r["title"], q)
                out.append(s)
            return out

    def get(self, owner: str, conversation_id: str) -> dict:
        """One conversation with its messages in order."""
        with self._connect() as conn:
            row = self._row(conn, owner, conversation_id)
            msgs = conn.execute("SELECT * FROM messages WHERE conversation=? ORDER BY position",
                                (row["id"],)).fetchall()
            out = self._summary(row, len(msgs))
            out["messages"] = [_message_out(m) for m in msgs]
            return out

    # -- writes
    def create(self, owner: str, body: dict | None = None) -> dict:
        """A new conversation (title, model, settings, optional first messages); returns it as `get` does."""
        body = body if body is not None else {}
        fields = _fields(body, creating=True)
        messages = body.get("messages") if isinstance(body, dict) else None
        checked = self._check_messages(messages) if messages is not None else []
        now = time.time()
        cid = secrets.token_hex(16)
        with self._connect(write=True) as conn:
            count = conn.execute("SELECT COUNT(*) FROM conversations WHERE owner=?", (owner,)).fetchone()[0]
            if count >= MAX_CONVERSATIONS:
                raise InvalidRequestError(f"at most {MAX_CONVERSATIONS} conversations per user; delete some first")
            conn.execute("INSERT INTO conversations (id, owner, title, model, settings, created, updated) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (cid, owner, fields.get("title") or "New chat", fields.get("model"),
                          fields.get("settings", "{}"), now, now))
            self._append(conn, cid, 0, checked, now)
        return self.get(owner, cid)

    def update(self, owner: str, conversation_id: str, body: dict) -> dict:
        """Change title, model and/or settings (settings replace the stored ones as a whole)."""
        fields = _fields(body, creating=False)
        with self._connect(write=True) as conn:
            row = self._row(conn, owner, conversation_id)
            if fields:
                sets = ", ".join(f"{k}=?" for k in fields)
                conn.execute(f"UPDATE conversations SET {sets}, updated=? WHERE id=?",
                             (*fields.values(), time.time(), row["id"]))
        return self.get(owner, conversation_id)

    def delete(self, owner: str, conversation_id: str) -> None:
        """Remove a conversation and its messages."""
        with self._connect(write=True) as conn:
            row = self._row(conn, owner, conversation_id)
            conn.execute("DELETE FROM conversations WHERE id=?", (row["id"],))

    def write_messages(self, owner: str, conversation_id: str, messages: Any,
                       replace_from: Any = None) -> dict:
        """Append `messages`; with `replace_from` = i, first drop message i and every later one (regenerate,
        edit-and-resend), all in one transaction. Returns the conversation's summary (as `list` gives it) with
        `written`: the new messages with their ids (not the whole history, which can be long)."""
        checked = self._check_messages(messages)
        with self._connect(write=True) as conn:
            row = self._row(conn, owner, conversation_id)
            count = conn.execute("SELECT COUNT(*) FROM messages WHERE conversation=?", (row["id"],)).fetchone()[0]
            if replace_from is not None:
                start = _integer(replace_from, "replace_from", 0, count)
                conn.execute("DELETE FROM messages WHERE conversation=? AND position>=?", (row["id"], start))
            else:
                start = count
            now = time.time()
            self._append(conn, row["id"], start, checked, now)
            conn.execute("UPDATE conversations SET updated=? WHERE id=?", (now, row["id"]))
            written = conn.execute("SELECT * FROM messages WHERE conversation=? AND position>=? ORDER BY position",
                                   (row["id"], start)).fetchall()
            row = self._row(conn, owner, conversation_id)
            out = self._summary(row, start + len(written))
        out["written"] = [_message_out(m) for m in written]
        return out

    # -- helpers
    @staticmethod
    def _check_messages(messages: Any) -> list[tuple[str, str, str]]:
        if not isinstance(messages, list):
            raise InvalidRequestError("'messages' must be an array", "messages")
        if len(messages) > MAX_WRITE:
            raise InvalidRequestError(f"at most {MAX_WRITE} messages per write", "messages")
        return [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]

    @staticmethod
    def _append(conn, cid: str, start: int, checked, now: float) -> None:
        if not checked:
            return
        if start + len(checked) > MAX_MESSAGES:
            raise InvalidRequestError(f"a conversation holds at most {MAX_MESSAGES} messages", "messages")
        stored = conn.execute("SELECT COALESCE(SUM(length(content)), 0) FROM messages WHERE conversation=? "
                              "AND position<?", (cid, start)).fetchone()[0]
        if stored + sum(len(c) for _, c, _ in checked) > MAX_CONVERSATION_CHARS:
            raise InvalidRequestError(f"a conversation holds at most {MAX_CONVERSATION_CHARS} characters; "
                                      "start a new one", "messages")
        conn.executemany("INSERT INTO messages (conversation, position, role, content, meta, created) "
                         "VALUES (?, ?, ?, ?, ?, ?)",
                         [(cid, start + i, role, content, meta, now) for i, (role, content, meta) in
                          enumerate(checked)])

    @staticmethod
    def _row(conn, owner: str, conversation_id: Any) -> sqlite3.Row:
        if not isinstance(conversation_id, str) or not _ID.match(conversation_id):
            raise ConversationNotFoundError(str(conversation_id)[:64])
        row = conn.execute("SELECT * FROM conversations WHERE id=? AND owner=?", (conversation_id, owner)).fetchone()
        if row is None:
            raise ConversationNotFoundError(conversation_id)
        return row

    @staticmethod
    def _summary(row: sqlite3.Row, n: int | None = None) -> dict:
        return {"id": row["id"], "title": row["title"], "model": row["model"],
                "settings": loads_json(row["settings"] or "{}"), "created": row["created"],
                "updated": row["updated"], "message_count": row["n"] if n is None else n}


def _message_out(m: sqlite3.Row) -> dict:
    return {"id": m["id"], "role": m["role"], "content": m["content"], "meta": loads_json(m["meta"] or "{}"),
            "created": m["created"]}


def _snippet(text: str, folded_query: str, width: int = 60) -> str:
    """About `width` characters either side of the first match (casefolding can change lengths: approximate)."""
    at = _fold(text).find(folded_query)
    at = max(0, at)
    start, end = max(0, at - width), min(len(text), at + len(folded_query) + width)
    return ("…" if start else "") + " ".join(text[start:end].split()) + ("…" if end < len(text) else "")
