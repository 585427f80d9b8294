"""DPO: the sigmoid loss as a pure function, the adapter-disabled reference, and a held-out margin gain."""
from __future__ import annotations

import math

import torch

from llamaforge.train.config import TrainConfig
from llamaforge.train.data import collate_preference, load_dataset
from llamaforge.train.strategies import DPOStrategy, dpo_loss, sequence_logps
from llamaforge.train.jobs import train
from test_train_utils import ChatMLFormat, TinyLM, tiny_llama, write_jsonl

FMT = ChatMLFormat()


def test_dpo_loss_formula():
    pc, pr = torch.tensor([-3.0, -1.0]), torch.tensor([-4.0, -0.5])
    rc, rr = torch.tensor([-3.5, -1.0]), torch.tensor([-3.5, -1.0])
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # Rafailov et al. 2023, eq. 7, written out by hand.
    z = [0.5 * ((-3.0 + 3.5) - (-4.0 + 3.5)), 0.5 * ((-1.0 + 1.0) - (-0.5 + 1.0))]
    torch.testing.assert_close(losses, torch.tensor([math.log1p(math.exp(-v)) for v in z]))
    torch.testing.assert_close(cr - rj, torch.tensor(z))
    # Identical policy and reference: loss is log 2 whatever the log-probs.
    same, _, _ = dpo_loss(pc, pr, pc, pr, beta=0.1)
    torch.testing.assert_close(same, torch.full((2,), math.log(2.0)))
    # Its gradient raises the chosen and lowers the rejected log-prob.
    p = pc.clone().requires_grad_(True)
    q = pr.clone().requires_grad_(True)
    dpo_loss(p, q, rc, rr, 0.1)[0].sum().backward()
    assert (p.grad < 0).all() and (q.grad > 0).all()


def test_sequence_logps_match_full_softmax():
    model = tiny_llama()
    ids = torch.randint(8, 200, (2, 10))
    labels = torch.full_like(ids, -100)
    labels[0, 3:6] = ids[0, 4:7]
    labels[1, 7:9] = ids[1, 8:10]
    with torch.no_grad():
        got = sequence_logps(model, ids, labels)
        logp = torch.log_softmax(model(ids), -1)
    want = torch.stack([logp[0, 3:6].gather(-1, ids[0, 4:7, None]).sum(),
                        logp[1, 7:9].gather(-1, ids[1, 8:10, None]).sum()])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _pairs(qs):
    return [{"prompt": f"Tell me about {q}.", "chosen": f"{q} is great.", "rejected": "I do not know."} for q in qs]


def _margins(model, examples):
    b = collate_preference(examples)
    with torch.no_grad():
        lp = sequence_logps(model.eval(), b["input_ids"], b["labels"])
    n = len(examples)
    return lp[:n] - lp[n:]


def test_dpo_lora_raises_heldout_margin_with_adapter_as_reference(tmp_path):
    train_f = write_jsonl(tmp_path / "train.jsonl", _pairs(["cats", "dogs", "tea", "rain", "maps", "jazz", "kites",
                                                            "bread"]))
    held_f = write_jsonl(tmp_path / "held.jsonl", _pairs(["owls", "snow", "chess", "figs"]))
    held = load_dataset(held_f, FMT, kind="preference")
    lm = TinyLM(tiny_llama())
    before = _margins(lm.model, held)
    cfg = TrainConfig(data=str(train_f), out=str(tmp_path / "o"), task="dpo", method="lora", lr=2e-2,
                      max_steps=12, batch_size=4, dpo_beta=0.1, seed=0)
    res = train(cfg, lm=lm, chat_format=FMT)
    after = _margins(lm.model, held)
    assert (after > before).all() and after.mean() - before.mean() > 1.0
    assert res.losses[-1] < res.losses[0] and abs(res.losses[0] - math.log(2)) < 1e-4


def test_lora_dpo_reference_is_the_base_without_a_copy(tmp_path):
    model = tiny_llama()
    base = tiny_llama()
    strat = DPOStrategy(TrainConfig(task="dpo", method="lora", lora_r=4))
    strat.prepare(model)
    assert strat.ref_model is None  # no second model for LoRA
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ex = load_dataset(write_jsonl(tmp_path / "p.jsonl", _pairs(["cats"])), FMT, kind="preference")
    b = collate_preference(ex)
    ref = strat.reference_logps(model, b)
    with torch.no_grad():
        torch.testing.assert_close(ref, sequence_logps(base, b["input_ids"], b["labels"]), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(sequence_logps(model, b["input_ids"], b["labels"]), ref, atol=1e-3)
