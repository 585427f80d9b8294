"""`llamaforge generate/run --json-schema FILE --grammar FILE --regex RE` as a user runs them (subprocesses on the
real SmolLM2 model); the output is judged by `jsonschema` and `re`."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from test_cli_generate import cli

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                           "population": {"type": "integer", "minimum": 0}},
          "required": ["city", "population"], "additionalProperties": False}


def test_generate_json_schema_file(tmp_path):
    f = tmp_path / "schema.json"
    f.write_text(json.dumps(SCHEMA))
    r = cli("generate", "smollm2", "The largest city of France, as JSON:", "--json-schema", str(f),
            "--temperature", "0", "--max-tokens", "40", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    if out["finish_reason"] == "stop":
        jsonschema.validate(json.loads(out["text"]), SCHEMA)
    else:
        assert out["finish_reason"] == "length"


@pytest.mark.slow
def test_run_regex_and_gbnf_grammar(tmp_path):
    r = cli("run", "smollm2", "Is the sky blue? Answer yes or no.", "--regex", "(yes|no)[.!]?",
            "--temperature", "0", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"(yes|no)[.!]?", r.stdout.strip()), r.stdout
    g = tmp_path / "digits.gbnf"
    g.write_text('root ::= [0-9] [0-9]? " apples"\n')
    r = cli("generate", "smollm2", "How many apples? ", "--grammar", str(g), "--temperature", "0",
            "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"[0-9]{1,2} apples", r.stdout.strip()), r.stdout


def test_bad_constraint_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = cli("generate", "smollm2", "x", "--json-schema", str(bad))
    assert r.returncode != 0 and "--json-schema" in r.stderr and "not JSON" in r.stderr
    r = cli("generate", "smollm2", "x", "--grammar", str(tmp_path / "missing.lark"))
    assert r.returncode != 0 and "--grammar" in r.stderr and "Traceback" not in r.stderr
    big = tmp_path / "big.json"
    big.write_text(" " * (2 << 20))
    r = cli("generate", "smollm2", "x", "--json-schema", str(big))
    assert r.returncode != 0 and "larger than the limit" in r.stderr


@pytest.mark.slow
def test_unenforceable_schema_is_a_clear_error(tmp_path):
    unsupported = tmp_path / "u.json"
    unsupported.write_text(json.dumps({"type": "array", "uniqueItems": True}))
    r = cli("generate", "smollm2", "x", "--json-schema", str(unsupported), "--max-tokens", "2")
    assert r.returncode != 0 and "uniqueItems" in r.stderr and "Traceback" not in r.stderr
