"""The guard classifier: Meta prompt-format parity, the score and categories of a tiny random Llama Guard checked
against transformers running the same weights, thresholds, windows, load validation and bad input."""
from __future__ import annotations

import pytest
import torch

from llamaforge.errors import InvalidRequestError
from llamaforge.safety.categories import LLAMA_GUARD_3 as CATS
from llamaforge.safety.categories import custom_categories
from llamaforge.safety.classifier import Guard, GuardError
from llamaforge.safety.guard_format import LLAMA_GUARD_3, conversation_turns
from llamaforge.safety.guards import detect_format, load_guard
from safety_support import render_meta, tiny_guard_lm

CONVERSATIONS = [
    [{"role": "user", "content": "How do I kill a stuck process?"}],
    [{"role": "user", "content": "  What is the capital of France?  "},
     {"role": "assistant", "content": "Paris.\n"}],
    [{"role": "user", "content": "Tell me a joke"}, {"role": "assistant", "content": "Why did the chicken..."},
     {"role": "user", "content": "Another one, with <|eot_id|> in it"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_prompt_text_matches_metas_template(messages):
    role = "agent" if messages[-1]["role"] == "assistant" else "user"
    ours = LLAMA_GUARD_3.render(conversation_turns(messages, role), CATS)
    assert ours == render_meta(messages)


def test_excluded_and_custom_categories_match_metas_template():
    msgs = CONVERSATIONS[0]
    kept = [c for c in CATS if c.code not in ("S6", "S12")]
    assert LLAMA_GUARD_3.render(conversation_turns(msgs), kept) == render_meta(msgs, excluded=["S6", "S12"])
    custom = custom_categories({"S1": "Medical misinformation", "S2": {"name": "Competitor praise",
                                                                       "description": "Praising rival products."}})
    meta_cats = {"S1": "Medical misinformation.", "S2": "Competitor praise.\nPraising rival products."}
    assert LLAMA_GUARD_3.render(conversation_turns(msgs), custom) == render_meta(msgs, categories=meta_cats)


def test_prompt_ids_match_the_llama3_tokenizer_on_metas_text(llama3_tokenizer_model):
    """Token level: our parts encode exactly as Meta's tokenizer encodes the rendered template (control tokens
    recognised), and a user typing a control token gets plain text."""
    from llamaforge.tokenizer.load import load_tokenizer
    tok = load_tokenizer(llama3_tokenizer_model)

    class LM:  # the parts of a LoadedModel a Guard reads
        tokenizer = tok
        config = type("C", (), {"max_position_embeddings": 8192})()
        model = None

    g = Guard(LM(), LLAMA_GUARD_3, CATS)
    for messages in CONVERSATIONS[:2]:
        role = "agent" if messages[-1]["role"] == "assistant" else "user"
        want = tok.encode(render_meta(messages), allow_special=True) + tok.encode("\n\n")
        assert g.prompt_ids(messages, role) == want
    ids = g.prompt_ids(CONVERSATIONS[2])
    assert ids.count(tok.special_tokens["<|eot_id|>"]) == 1  # only the template's own
    assert g._unsafe[0] == 39257 and g._safe_first == 19193 and g._lead == [271]


def _reference_probs(lm, hf, ids):
    with torch.no_grad():
        return torch.softmax(hf(torch.tensor([ids])).logits[0, -1].float(), dim=-1)


@pytest.fixture(scope="module")
def tiny():
    from conftest import make_tiny_hf
    lm = tiny_guard_lm(seed=0)
    hf = make_tiny_hf("llama31", vocab_size=260, seed=0)
    return lm, hf


def test_score_is_the_probability_of_unsafe_as_transformers_computes_it(tiny):
    lm, hf = tiny
    g = Guard(lm, LLAMA_GUARD_3, CATS, threshold=0.0)
    for text in ("How do I kill a stuck process?", "Write a poem about the sea."):
        v = g.check(text)
        ids = g.prompt_ids(text)
        p = _reference_probs(lm, hf, ids)
        assert v.score == pytest.approx(float(p[ord("u")]), rel=1e-4, abs=1e-7)
        # Category shares: P(first code = c | "unsafe\n") from transformers, teacher-forced.
        base = ids + list(b"unsafe\n")
        raw = {}
        for c in g.categories:
            seq = base + list(c.code.encode())
            with torch.no_grad():
                lp = torch.log_softmax(hf(torch.tensor([seq])).logits[0].float(), dim=-1)
            raw[c.code] = sum(float(lp[len(base) - 1 + k, t]) for k, t in enumerate(c.code.encode()))
        z = torch.logsumexp(torch.tensor(list(raw.values())), 0)
        for code, lpv in raw.items():
            assert v.category_scores[code] == pytest.approx(v.score * float(torch.exp(lpv - z)), rel=1e-3)
        # Listed categories: what greedy decoding after "unsafe\n" writes (transformers' generate).
        with torch.no_grad():
            out = hf.generate(torch.tensor([base]), max_new_tokens=24, do_sample=False, eos_token_id=[259, 10],
                              pad_token_id=0)[0, len(base):].tolist()
        written = bytes(t for t in out if t < 256).split(b"\n")[0].decode("utf-8", "replace")
        import re
        listed = [m for m in re.findall(r"S[1-9][0-9]?", written) if m in {c.code for c in CATS}]
        if listed:
            assert v.categories == sorted(set(listed), key=lambda c: int(c[1:]))
        else:
            assert v.categories == [max(v.category_scores, key=v.category_scores.get)]
        assert not v.safe


def test_thresholds_decide(tiny):
    lm, _ = tiny
    text = "How do I kill a stuck process?"
    base = Guard(lm, LLAMA_GUARD_3, CATS, threshold=0.0).check(text)
    assert Guard(lm, LLAMA_GUARD_3, CATS, threshold=1.0).check(text).safe
    # A per-category threshold above the score quiets that category only.
    first = base.categories[0]
    quiet = Guard(lm, LLAMA_GUARD_3, CATS, threshold=0.0, thresholds={first: 1.0}).check(text)
    assert first not in quiet.categories
    # An explicit low threshold flags a category whose own score reaches it, even when not listed.
    other = min(base.category_scores, key=base.category_scores.get)
    loud = Guard(lm, LLAMA_GUARD_3, CATS, threshold=1.0, thresholds={other: 0.0}).check(text)
    assert loud.categories == [other] and not loud.safe


def test_excluded_categories_leave_the_prompt_and_the_answer(tiny):
    lm, _ = tiny
    g = Guard(lm, LLAMA_GUARD_3, CATS, threshold=0.0, excluded=["S1", "S2"])
    v = g.check("hello")
    assert "S1: Violent" not in lm.tokenizer.decode(g.prompt_ids("hello"))
    assert not set(v.categories) & {"S1", "S2"} and "S1" not in v.category_scores
    with pytest.raises(InvalidRequestError):
        Guard(lm, LLAMA_GUARD_3, CATS, excluded=["S99"])
    with pytest.raises(InvalidRequestError):
        Guard(lm, LLAMA_GUARD_3, CATS, threshold=1.5)


def test_long_text_is_windowed_and_bounded(tiny):
    lm, _ = tiny
    g = Guard(lm, LLAMA_GUARD_3, CATS, threshold=1.0, window=1100)
    v = g.check("word " * 300)
    assert v.windows > 1 and v.safe
    assert len(g.prompt_ids("word " * 300)) <= 1100
    with pytest.raises(InvalidRequestError, match="windows"):
        g.check("a" * 70_000)
    with pytest.raises(InvalidRequestError):
        g.check("a" * ((1 << 20) + 1))
    with pytest.raises(InvalidRequestError):
        g.check(b"\x00\x01binary")
    assert g.check("").safe  # empty text is a (safe) check, not an error
    with pytest.raises(InvalidRequestError):
        g.check([{"role": "system", "content": "only a system prompt"}])


def test_a_model_not_in_llama_guard_format_is_refused_at_load():
    from test_generate_support import tiny_lm
    with pytest.raises(GuardError, match="not in Llama Guard format"):
        load_guard(tiny_lm())  # byte vocabulary without header tokens
    chat = tiny_guard_lm(template="{% for m in messages %}{{ m.content }}{% endfor %}", name="tiny-chat")
    with pytest.raises(GuardError, match="ordinary chat format"):
        load_guard(chat)
    nameless = tiny_guard_lm(template=None, name="tiny-chat")
    with pytest.raises(GuardError, match="no chat template"):
        detect_format(nameless)
    assert detect_format(tiny_guard_lm()) is LLAMA_GUARD_3
    with pytest.raises(GuardError, match="custom categories"):
        load_guard(None, categories=["Weather talk"])
