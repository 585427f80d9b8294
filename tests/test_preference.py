"""KTO and ORPO strategies on tiny Llamas: the batch loss is the papers' loss on the model's own log-probs (KL
rows are mismatched pairs), unpaired data loading, and held-out preferences improve."""
from __future__ import annotations

import pytest
import torch

from llamaforge.errors import InvalidRequestError
from llamaforge.train.config import TrainConfig
from llamaforge.train.data import DatasetError, collate_preference, load_dataset
from llamaforge.train.preference import KTOStrategy, ORPOStrategy, kto_loss, orpo_loss
from llamaforge.train.strategies import sequence_logps
from llamaforge.train.jobs import train
from test_train_utils import ChatMLFormat, TinyLM, tiny_llama, write_jsonl

FMT = ChatMLFormat()


def _pairs(qs):
    return [{"prompt": f"Tell me about {q}.", "chosen": f"{q} is great.", "rejected": "I do not know."} for q in qs]


def _margins(model, examples):
    b = collate_preference(examples)
    with torch.no_grad():
        lp = sequence_logps(model.eval(), b["input_ids"], b["labels"])
    n = len(examples)
    return lp[:n] - lp[n:]


def test_unpaired_loading(tmp_path):
    f = write_jsonl(tmp_path / "u.jsonl", [
        {"prompt": "Hi?", "completion": "Hello!", "label": True},
        {"prompt": [{"role": "user", "content": "Bye?"}], "completion": "No.", "label": False},
        {"prompt": "Q", "chosen": "good", "rejected": "bad"}])
    exs = load_dataset(f, FMT, kind="unpaired")
    assert [e.label for e in exs] == [True, False, True, False] and [e.line for e in exs] == [1, 2, 3, 3]
    for e in exs:
        assert not any(e.mask[:e.prompt_len]) and any(e.mask[e.prompt_len:])
        assert e.ids[:e.prompt_len] == FMT.encode_with_mask([{"role": "user", "content": "Hi?" if e.line == 1
                                                              else "Bye?" if e.line == 2 else "Q"}])[0]
    for rec, needle in [({"prompt": "a", "completion": "b"}, "missing 'label'"),
                        ({"prompt": "a", "completion": "b", "label": "yes"}, "'label' must be true"),
                        ({"prompt": "a", "chosen": "b"}, "missing 'rejected'")]:
        with pytest.raises(DatasetError, match=needle):
            load_dataset(write_jsonl(tmp_path / "bad.jsonl", [rec]), FMT, kind="unpaired")


def test_kto_batch_loss_uses_mismatched_kl_pairs(tmp_path):
    f = write_jsonl(tmp_path / "u.jsonl", _pairs(["cats", "tea", "rain"]))
    exs = load_dataset(f, FMT, kind="unpaired")[:3]   # cats+, cats-, tea+
    strat = KTOStrategy(TrainConfig(task="kto", method="lora", kto_beta=0.5))
    model = tiny_llama()
    strat.prepare(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    batch = strat.collate(exs)
    with torch.no_grad():
        loss, st = strat.loss_sum(model, batch)
    # Independently: KL rows are prompt i with the completion of example i-1.
    base = tiny_llama()
    with torch.no_grad():
        def logp(m, ids, mask):
            from llamaforge.train.data import collate
            b = collate([(ids, mask)])
            return sequence_logps(m, b["input_ids"], b["labels"])[0]
        pol = torch.stack([logp(model, e.ids, e.mask) for e in exs])
        ref = torch.stack([logp(base, e.ids, e.mask) for e in exs])
        kl_terms = []
        for i, e in enumerate(exs):
            o = exs[i - 1]
            ids = e.ids[:e.prompt_len] + o.ids[o.prompt_len:]
            mask = [False] * e.prompt_len + o.mask[o.prompt_len:]
            kl_terms.append(logp(model, ids, mask) - logp(base, ids, mask))
        kl = torch.stack(kl_terms).mean().clamp(min=0)
        want, _ = kto_loss(pol, ref, torch.tensor([True, False, True]), kl, beta=0.5)
    torch.testing.assert_close(loss, want.sum(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st["kl"] / 3, kl, atol=1e-5, rtol=1e-5)
    with pytest.raises(InvalidRequestError, match="batch_size") as e:
        TrainConfig(task="kto", batch_size=1, out="o").validate(("out",))
    assert e.value.field == "batch_size"


def test_orpo_batch_loss_uses_length_normalised_logps():
    f_pairs = _pairs(["cats", "tea"])
    strat = ORPOStrategy(TrainConfig(task="orpo", method="full", orpo_lambda=0.3))
    model = tiny_llama()
    strat.prepare(model)
    assert strat.ref_model is None   # ORPO has no reference model, even for full fine-tuning
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        exs = load_dataset(write_jsonl(Path(d) / "p.jsonl", f_pairs), FMT, kind="preference")
    batch = strat.collate(exs)
    with torch.no_grad():
        loss, _ = strat.loss_sum(model, batch)
        lp = sequence_logps(model, batch["input_ids"], batch["labels"])
        n_tok = torch.tensor([sum(e.mask[1:]) for e in exs] + [sum(e.rejected_mask[1:]) for e in exs])
        mean = lp / n_tok
        want, _ = orpo_loss(mean[:2], mean[2:], 0.3)
    torch.testing.assert_close(loss, want.sum(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("task", ["kto", "orpo"])
def test_training_raises_heldout_margin(tmp_path, task):
    train_f = write_jsonl(tmp_path / "train.jsonl", _pairs(["cats", "dogs", "tea", "rain", "maps", "jazz"]))
    held = load_dataset(write_jsonl(tmp_path / "held.jsonl", _pairs(["owls", "snow", "chess"])), FMT,
                        kind="preference")
    lm = TinyLM(tiny_llama())
    before = _margins(lm.model, held)
    cfg = TrainConfig(data=str(train_f), out=str(tmp_path / "o"), task=task, method="lora", lr=2e-2,
                      max_steps=10, batch_size=4, seed=0, orpo_lambda=1.0)
    res = train(cfg, lm=lm, chat_format=FMT)
    after = _margins(lm.model, held)
    assert (after > before).all() and after.mean() - before.mean() > 1.0
    assert res.losses[-1] < res.losses[0]
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()
