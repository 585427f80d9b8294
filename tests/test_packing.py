"""Packing done right: positions restart per document and attention is block-diagonal, so a packed batch gives
the same loss as the same documents unpacked; checked against transformers' own packed (padding-free) forward."""
from __future__ import annotations

import torch

from llamaforge.train.config import TrainConfig
from llamaforge.train.data import IGNORE, Example, block_causal_mask, collate_sft, pack_examples
from llamaforge.train.strategies import Strategy
from llamaforge.train.jobs import train
from test_train_utils import VOCAB, TinyLM, llama_from_hf, tiny_llama


def _docs(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(5, 19, (1,), generator=g))
        ids = torch.randint(8, VOCAB, (k,), generator=g).tolist()
        mask = [j >= k // 3 for j in range(k)]           # a "prompt" part without loss, then targets
        out.append(Example(ids, mask, line=i + 1))
    return out


def test_pack_records_documents_and_collate_restarts_positions():
    docs = _docs()
    rows = pack_examples(docs, 40)
    assert len(rows) < len(docs) and all(len(r.ids) <= 40 for r in rows)
    assert [k for r in rows for k in r.doc_lens] == [len(d.ids) for d in docs]
    assert sum(r.n_targets for r in rows) == sum(d.n_targets for d in docs)
    b = collate_sft(rows)
    r0 = rows[0]
    a = r0.doc_lens[0]
    assert b["position_ids"][0, :a].tolist() == list(range(a))
    assert b["position_ids"][0, a] == 0                        # the second document starts again at 0
    assert b["labels"][0, a - 1] == IGNORE                     # no label crosses the boundary
    assert set(b["doc_ids"][0, :len(r0.ids)].tolist()) == set(range(len(r0.doc_lens)))
    if len(rows[-1].ids) < b["input_ids"].shape[1]:
        assert b["doc_ids"][-1, -1] == -1                      # padding is its own block
    m = block_causal_mask(torch.tensor([[0, 0, 1, 1, 1]]))[0, 0]
    assert m.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]


def test_packed_loss_equals_unpacked_loss():
    model = tiny_llama().eval()
    docs = _docs(9, seed=1)
    strat = Strategy(TrainConfig())
    rows = pack_examples(docs, 48)
    assert any(len(r.doc_lens) > 2 for r in rows)
    with torch.no_grad():
        packed, _ = strat.loss_sum(model, collate_sft(rows))
        unpacked = sum(strat.loss_sum(model, collate_sft([d]))[0] for d in docs)
        padded, _ = strat.loss_sum(model, collate_sft(docs))
    assert strat.count(rows) == strat.count(docs)
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-4)
    # The old way (plain causal attention over the concatenation, positions running on) gives another loss.
    b = collate_sft(rows)
    with torch.no_grad():
        leaky, _ = strat.loss_sum(model, {"input_ids": b["input_ids"], "labels": b["labels"]})
    assert abs(float(leaky) - float(packed)) > 1e-2


def test_packed_gradients_equal_unpacked_gradients():
    docs = _docs(6, seed=2)
    strat = Strategy(TrainConfig())
    grads = []
    for batch in (collate_sft(pack_examples(docs, 64)), collate_sft(docs)):
        model = tiny_llama()
        loss, _ = strat.loss_sum(model, batch)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_packed_logits_match_transformers_padding_free_forward():
    # transformers reads packed documents from position_ids that restart at 0 (its DataCollatorWithFlattening
    # format) and builds the same block-diagonal mask for SDPA (training forwards: no cache).
    from conftest import make_tiny_hf
    hf = make_tiny_hf("llama31", vocab_size=VOCAB)
    ours = llama_from_hf(hf)
    docs = _docs(4, seed=3)
    row = pack_examples(docs, 1000)
    assert len(row) == 1 and len(row[0].doc_lens) == 4
    b = collate_sft(row)
    with torch.no_grad():
        want = hf(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        got = ours(b["input_ids"], position_ids=b["position_ids"], attn_mask=block_causal_mask(b["doc_ids"]))
        alone = torch.cat([ours(torch.tensor([d.ids])) for d in docs], dim=1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, alone, atol=1e-4, rtol=1e-4)


def test_trainer_packing_first_loss_equals_unpacked(tmp_path):
    docs = _docs(8, seed=4)
    losses = []
    for packing in (True, False):
        cfg = TrainConfig(out=str(tmp_path / f"p{packing}"), method="full", max_steps=1, batch_size=8,
                          max_seq_len=64, packing=packing, lr=1e-3)
        res = train(cfg, lm=TinyLM(tiny_llama()), examples=docs)
        losses.append(res.losses[0])
    assert abs(losses[0] - losses[1]) < 1e-4
