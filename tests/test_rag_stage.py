"""The retrieval stage of the request seam: sources and grounding rules in the prompt, citations beside the
answer, [n] markers normalised and checked, bad retrieval fields refused naming the field; one grounded answer
from SmolLM2 end to end."""
from __future__ import annotations

import pytest
from rag_support import install_demo
from test_generate_support import smollm2, tiny_lm

import llamaforge  # noqa: F401  registers the retrieval stage
from llamaforge.errors import InvalidRequestError
from llamaforge.generate.api import build_request, chat
from llamaforge.generate.pipeline import STAGES, plan
from llamaforge.generate.stage import Delta, Output, Result
from llamaforge.rag.grounding import SYSTEM, CitationFilter

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def tiny_chat_lm(context: int = 4096):
    lm = tiny_lm(context=context)
    lm.defaults = {"template": TEMPLATE}
    return lm


def test_stage_is_registered_and_puts_sources_in_the_prompt(tmp_path_factory):
    assert "retrieval" in [s.name for s in STAGES]
    install_demo(tmp_path_factory)
    lm = tiny_chat_lm()
    q = "What is the name of the harbour ferry?"
    p = plan(lm, build_request(messages=[{"role": "user", "content": q}], retrieval={"collection": "demo", "k": 3}))
    assert [c["n"] for c in p.citations] == [1, 2, 3]
    assert set(p.citations[0]) >= {"n", "source", "text", "chunk_id"}
    assert p.citations[0]["source"].endswith("harbour_ferry.md") and "Grey Heron" in " ".join(
        c["text"] for c in p.citations)
    system, user = p.messages[0], p.messages[-1]
    assert system["role"] == "system" and system["content"] == SYSTEM
    assert "[1]" in user["content"] and "[3]" in user["content"] and q in user["content"]
    assert p.citations[0]["text"].split()[0] in user["content"]
    # the prompt ids are what the chat format makes of these messages: the sources reach the model
    assert "Grey Heron" in lm.tokenizer.decode(p.prompt_ids)


def test_sources_are_cut_to_fit_the_context(tmp_path_factory):
    install_demo(tmp_path_factory)
    req = lambda: build_request(messages=[{"role": "user", "content": "ferry name?"}],  # noqa: E731
                                retrieval={"collection": "demo", "k": 5}, max_tokens=32)
    wide = plan(tiny_chat_lm(4096), req())
    narrow = plan(tiny_chat_lm(600), req())      # byte tokens: about two sources fit
    assert len(wide.citations) == 5 and 1 <= len(narrow.citations) < 5
    assert [c["chunk_id"] for c in narrow.citations] == [c["chunk_id"] for c in wide.citations][:len(narrow.citations)]
    assert len(narrow.prompt_ids) + 32 <= 600


def test_callers_system_prompt_is_kept(tmp_path_factory):
    install_demo(tmp_path_factory)
    p = plan(tiny_chat_lm(), build_request(messages=[{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "ferry name?"}], retrieval="demo"))
    assert p.messages[0]["content"].startswith("Be brief.") and SYSTEM in p.messages[0]["content"]
    assert len([m for m in p.messages if m["role"] == "system"]) == 1


@pytest.mark.parametrize("retrieval,field", [
    ({"collection": "missing-one", "k": 3}, "retrieval.collection"),
    ({"collection": "../etc", "k": 3}, "retrieval.collection"),
    ({"collection": "demo", "k": 0}, "retrieval.k"),
    ({"collection": "demo", "k": 1000}, "retrieval.k"),
])
def test_bad_retrieval_fields_name_the_field(retrieval, field, tmp_path_factory):
    install_demo(tmp_path_factory)
    with pytest.raises(InvalidRequestError) as e:
        plan(tiny_chat_lm(), build_request(messages=[{"role": "user", "content": "hi"}], retrieval=retrieval))
    assert e.value.field == field


def test_retrieval_needs_messages(tmp_path_factory):
    install_demo(tmp_path_factory)
    with pytest.raises(InvalidRequestError, match="chat request") as e:
        plan(tiny_chat_lm(), build_request(prompt="hello", retrieval="demo"))
    assert e.value.field == "retrieval"


def _run_filter(pieces: list[str], n: int = 3):
    f = CitationFilter(n)
    out = Output([f], [{"n": i, "source": f"s{i}"} for i in range(1, n + 1)])
    streamed = "".join(d.text for p in pieces for d in out.feed(p))
    tail, result = out.finish("stop")
    return streamed + "".join(d.text for d in tail), result


@pytest.mark.parametrize("pieces,text,cited", [
    (["The ferry is the Grey Heron [1]."], "The ferry is the Grey Heron [1].", [1]),
    (["It is 1647 [", "2", "]."], "It is 1647 [2].", [2]),            # a marker split across tokens
    (["See [Source 3] and [1, 2]."], "See [3] and [1][2].", [3, 1, 2]),
    (["Wrong [7] source."], "Wrong  source.", []),                  # no source 7: the marker goes
    (["An array [x] stays."], "An array [x] stays.", []),
    (["unclosed [1"], "unclosed [1", []),
])
def test_citation_markers(pieces, text, cited):
    got, result = _run_filter(pieces)
    assert got == text and result.text == text
    assert [c["n"] for c in result.citations if c["cited"]] == sorted(cited)
    assert [c["cited"] for c in result.citations] == [i in cited for i in (1, 2, 3)]


SOURCES = [{"n": 1, "source": "a.md", "text": "The ferry is called the Grey Heron and carries 120 people."},
           {"n": 2, "source": "b.md", "text": "The kettle holds 1.7 litres and uses 2200 watts."},
           {"n": 3, "source": "b.md", "text": "The kettle warranty is 3 years."}]


@pytest.mark.parametrize("answer,expect,how", [
    ("The ferry is the Grey Heron.", "The ferry is the Grey Heron. [1]", "attributed"),
    ("It holds 1.7 litres", "It holds 1.7 litres [2]", "attributed"),
    ("The warranty lasts 3 years [3].", "The warranty lasts 3 years [3].", "model"),   # the model's own stays
    ("The sources do not say.", "The sources do not say.", "none"),
    ("Blue.", "Blue.", "none"),                                            # nothing distinctive: no guess
])
def test_unmarked_answers_are_attributed_to_the_source_with_their_words(answer, expect, how):
    out = Output([CitationFilter(SOURCES)], SOURCES)
    text = "".join(d.text for d in out.feed(answer))
    tail, result = out.finish("stop")
    assert text + "".join(d.text for d in tail) == expect == result.text
    assert result.extra["citation_markers"] == how


@pytest.mark.parametrize("pieces,expect,how", [
    # the model copied from [1] and wrote [3]: the marker follows the words (also when split across tokens)
    (["The kettle holds 1.7 litres and uses 2200 watts [1]."], "The kettle holds 1.7 litres and uses 2200 watts [2].",
     "corrected"),
    (["The kettle holds 1.7 litres. [", "1]"], "The kettle holds 1.7 litres. [2]", "corrected"),
    (["The ferry is the Grey Heron [1]. The warranty is 3 years [3]."],
     "The ferry is the Grey Heron [1]. The warranty is 3 years [3].", "model"),      # each right: kept
    (["The warranty is 3 years [2]."], "The warranty is 3 years [3].", "corrected"),  # same file, better passage
    (["It is blue [2]."], "It is blue [2].", "model"),                              # nothing to go by: kept
])
def test_wrong_markers_follow_the_words_used(pieces, expect, how):
    out = Output([CitationFilter(SOURCES)], SOURCES)
    text = "".join(d.text for p in pieces for d in out.feed(p))
    tail, result = out.finish("stop")
    assert text + "".join(d.text for d in tail) == expect == result.text
    assert result.extra["citation_markers"] == how


def test_citation_filter_passes_tool_call_deltas():
    f = CitationFilter(2)
    d = Delta("", tool_calls=[{"index": 0}])
    assert f.feed([d]) == [d]
    assert f.finish(Result()) == []


def test_grounded_answer_from_smollm2(tmp_path_factory):
    install_demo(tmp_path_factory)
    c = chat(smollm2(), [{"role": "user", "content": "What is the name of the harbour ferry?"}],
             retrieval={"collection": "demo", "k": 3}, temperature=0, max_tokens=40)
    assert "Grey Heron" in c.text
    cited = [x for x in c.citations if x["cited"]]
    assert cited and cited[0]["source"].endswith("harbour_ferry.md")
    assert f"[{cited[0]['n']}]" in c.text


def test_nothing_retrieved_means_no_sources_and_no_citation(tmp_path_factory):
    # an empty collection: the model is told there are no sources, and whatever marker
    # it writes names no passage, so it is removed: a citation is never made up
    from llamaforge.rag.index import Index, rag_home
    rag_home().mkdir(parents=True, exist_ok=True)
    Index("empty", create=True).close()
    p = plan(tiny_chat_lm(), build_request(messages=[{"role": "user", "content": "Who built the tower?"}],
                                           retrieval="empty"))
    assert p.citations == [] and [m["role"] for m in p.messages] == ["system", "user"]
    assert "no sources" in p.messages[-1]["content"] and "Who built the tower?" in p.messages[-1]["content"]
    got, result = _run_filter(["It was Anna Holt [1]."], n=0)
    assert got == "It was Anna Holt ." and result.citations == [] and result.extra["citation_markers"] == "none"
