"""What the model is shown of the retrieved passages (rag/focus.py): the sentences that answer the question, in
the retriever's passage order, within a word budget. Texts here are invented for the test, not the demo set."""
from __future__ import annotations

from llamaforge.rag.focus import (MAX_SOURCES, answer_type_bonus, focus, lexical_scores, question_terms,
                                  split_sentences)

PUMP = ("Pump P3 Service Notes\n\n"
        "The P3 pump moves 40 litres a minute. Fault F2 means the filter is blocked. Fault F5 means the motor "
        "overheated and must cool for an hour. The pump was designed by Ruth Amsel in 2011.")
GARDEN = "The garden opens at 8:00. Fault reports go to the caretaker."
OTHER = ["The harbour has two piers.", "Tickets are sold at the gate.", "The museum shows old maps."]


def test_sentences_and_headings():
    parts = split_sentences(PUMP)
    assert parts[0] == "Pump P3 Service Notes" and parts[1] == "The P3 pump moves 40 litres a minute."
    assert split_sentences("one line\nwrapped here. Next one.") == ["one line wrapped here.", "Next one."]
    assert split_sentences("Items:\n- first item\n- second item") == ["Items:", "- first item", "- second item"]


def test_rare_code_outweighs_common_words():
    # "fault" and "means" are in three sentences, "F5" in one: the F5 sentence wins although it shares fewer
    # words with the question than the F2 one does.
    q = "What does fault F5 mean on the pump?"
    sents = split_sentences(PUMP)[1:]
    scores = lexical_scores(q, sents)
    assert max(range(len(sents)), key=scores.__getitem__) == 2
    assert question_terms(q)["f5"] == 2.0 and question_terms(q)["fault"] == 1.0


def test_answer_type_bonus():
    assert answer_type_bonus("How many litres does it move?", "It moves 40 litres.") > 0
    assert answer_type_bonus("How many litres does it move?", "It moves water.") == 0
    assert answer_type_bonus("Who designed the pump?", "It was designed by Ruth Amsel.") > 0
    assert answer_type_bonus("Who designed the pump?", "It was designed for farms.") == 0
    assert answer_type_bonus("Where is the pump?", "It stands in 3 rooms.") == 0


def test_focus_shows_the_answering_sentences_in_retriever_order():
    shown = focus("Who designed the P3 pump?", [PUMP, GARDEN] + OTHER)
    assert [s.index for s in shown] == list(range(MAX_SOURCES))       # retriever order, at most MAX_SOURCES
    assert "Ruth Amsel" in shown[0].text and "Service Notes" not in shown[0].text
    assert "F5" not in shown[0].text                                    # two sentences of the best passage
    assert len(shown[0].text.split(". ")) <= 2
    assert shown[1].text == "Fault reports go to the caretaker." or shown[1].text == "The garden opens at 8:00."
    # the budget bounds the prompt however long the passages are
    long = " ".join(f"Sentence {i} talks about pumps and filters at length." for i in range(400))
    out = focus("pumps and filters?", [long, long + " x", long + " y"], max_words=50)
    assert sum(len(s.text.split()) for s in out) <= 50 + 1


def test_similarity_breaks_ties_between_paraphrases():
    passages = ["The ferry carries up to 120 passengers. The ferry is painted white."]
    plain = focus("How many people fit on the ferry?", passages)
    sim = focus("How many people fit on the ferry?", passages,
                similarity=lambda q, ss: [1.0 if "passengers" in s else 0.0 for s in ss])
    assert "120" in plain[0].text and "120" in sim[0].text
    assert focus("anything?", []) == [] and focus("anything?", ["", "  "]) == []
