"""`llamaforge rag ...` end to end in process: ingest (twice: nothing added), search --json, list/show/rm, eval
(retrieval figures), ask --json with the default model, and the errors a user sees."""
from __future__ import annotations

import json

import pytest
from rag_support import DEMO_DOCS, DEMO_QUESTIONS

from llamaforge.cli.main import main


def run(capsys, *args):
    rc = main(["rag", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_ingest_search_list_show_rm_eval(capsys, tmp_path):
    rc, out, err = run(capsys, "ingest", "--collection", "demo", str(DEMO_DOCS), "--no-progress")
    assert rc == 0 and "10 added" in out and "0 failed" in out, (out, err)
    rc, out, _ = run(capsys, "ingest", "-c", "demo", str(DEMO_DOCS), "--json")
    rep = json.loads(out)
    assert rc == 0 and rep["added"] == [] and len(rep["unchanged"]) == 10 and rep["chunks"] == 0

    rc, out, _ = run(capsys, "search", "--collection", "demo", "Who founded Veltmark?", "--k", "3", "--json")
    hits = json.loads(out)
    assert rc == 0 and len(hits) == 3
    assert set(hits[0]) >= {"source", "text", "score", "chunk_id", "start", "end"}
    assert hits[0]["source"].endswith("veltmark_history.md") and "Ilse Varnholt" in hits[0]["text"]
    assert len({h["chunk_id"] for h in hits}) == 3
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]

    rc, out, _ = run(capsys, "list", "--json")
    assert rc == 0 and json.loads(out)[0]["name"] == "demo" and json.loads(out)[0]["documents"] == 10
    rc, out, _ = run(capsys, "show", "demo", "--json")
    info = json.loads(out)
    assert info["embedder"]["name"] == "all-MiniLM-L6-v2" and info["chunking"] == {"max_tokens": 160, "overlap": 32}

    rc, out, _ = run(capsys, "eval", "--collection", "demo", "--questions", str(DEMO_QUESTIONS), "--no-answers",
                     "--json")
    figures = json.loads(out)["retrieval"]
    assert rc == 0 and figures["hybrid"]["recall"] >= 0.9 and set(figures) == {"hybrid", "vector", "keyword"}

    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "x", "answer": "y", "source": "z"}\nnot json\n')
    rc, _, err = run(capsys, "eval", "-c", "demo", "--questions", str(bad), "--no-answers")
    assert rc == 1 and "q.jsonl:2" in err

    src = info["documents"][0]["source"]
    rc, out, _ = run(capsys, "rm", "demo", "--source", src)
    assert rc == 0
    rc, out, _ = run(capsys, "show", "demo", "--json")
    assert len(json.loads(out)["documents"]) == 9
    rc, out, _ = run(capsys, "rm", "demo")
    assert rc == 0 and "deleted" in out
    rc, out, _ = run(capsys, "list")
    assert "no collections" in out


@pytest.mark.parametrize("args,needle", [
    (["search", "-c", "nothing", "query"], "collection 'nothing' not found"),
    (["search", "-c", "../x", "query"], "invalid"),
    (["ask", "-c", "nothing", "why?"], "collection 'nothing' not found"),
    (["ask", "-c", "nothing", "why?", "--temperature", "-1"], "--temperature"),
    (["ingest", "-c", "x", "/no/such/path", "--no-progress"], "no such file"),
    (["ingest", "-c", "x", str(DEMO_DOCS), "--max-file-size", "ten"], "not a size"),
])
def test_user_errors(capsys, args, needle):
    with pytest.raises(SystemExit) if "--max-file-size" in args else _nothing():
        rc, out, err = run(capsys, *args)
        assert rc == 1 and needle in err, (out, err)
    if "--max-file-size" in args:
        assert needle in capsys.readouterr().err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_ask_json_with_the_default_model(capsys):
    assert run(capsys, "ingest", "-c", "demo", str(DEMO_DOCS), "--no-progress")[0] == 0
    rc, out, err = run(capsys, "ask", "--collection", "demo", "How many books can a library member borrow at the "
                       "same time?", "--k", "3", "--temperature", "0", "--max-tokens", "40", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert set(res) >= {"answer", "citations"} and "12" in res["answer"]
    assert res["grounding"] in ("model", "extracted")
    assert [c["n"] for c in res["citations"]] == [1, 2, 3]
    assert set(res["citations"][0]) >= {"n", "source", "text", "chunk_id"}
    cited = [c for c in res["citations"] if c["cited"]]
    assert cited and cited[0]["source"].endswith("library_policy.md")
