"""SamplingParams validation, the sampler's filters (against Hugging Face's logits warpers) and penalties."""
from __future__ import annotations

import math

import pytest
import torch

from llamaforge.errors import InvalidRequestError
from llamaforge.generate.sampling import (PenaltyProcessor, Sampler, SamplingParams, filter_logits,
                                          params_from_options)


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 2**40), ("max_tokens", 1.5), ("max_tokens", True),
    ("temperature", float("nan")), ("temperature", -0.1), ("temperature", float("inf")), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", float("nan")), ("top_k", -1), ("min_p", -0.1), ("min_p", 1.5),
    ("repeat_penalty", 0.0), ("repeat_penalty", float("nan")), ("presence_penalty", float("inf")),
    ("frequency_penalty", float("nan")), ("repeat_last_n", -2), ("seed", 1.5), ("logprobs", 21),
    ("logprobs", -1), ("stop_ids", [-1]), ("ignore_eos", "yes"),
])
def test_validate_names_the_field(field, value):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**{field: value}).validate()
    assert e.value.field == field
    assert field in str(e.value)


def test_stop_strings_validated():
    for stop in ([""], ["x" * 1001], ["a"] * 65, [3]):
        with pytest.raises(InvalidRequestError) as e:
            SamplingParams(stop=stop).validate()
        assert e.value.field == "stop"
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "b"]).validate().stop == ("a", "b")


def test_unknown_kwarg_is_named():
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams.from_kwargs(temperatur=0.5)
    assert e.value.field == "temperatur"


def test_params_from_options_converts_strings_and_aliases():
    got = params_from_options({"num_predict": "12", "temperature": "0.25", "top_k": 5, "stop": "###",
                               "ignore_eos": "true", "seed": "7"})
    assert got == {"max_tokens": 12, "temperature": 0.25, "top_k": 5, "stop": ("###",), "ignore_eos": True,
                   "seed": 7}
    assert params_from_options({"num_predict": -1}) == {}
    with pytest.raises(InvalidRequestError) as e:
        params_from_options({"num_predict": "0"})
    assert e.value.field == "num_predict" and "num_predict" in str(e.value)
    with pytest.raises(InvalidRequestError) as e:
        params_from_options({"temperature": "warm"})
    assert e.value.field == "temperature"
    with pytest.raises(InvalidRequestError) as e:
        params_from_options({"mirostat": 1})
    assert e.value.field == "mirostat"


def _hf_filtered(logits, temperature, top_k, top_p, min_p):
    # The reference: transformers' warpers applied in generate()'s order.
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    scores = logits[None].clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p > 0:
        warpers.append(MinPLogitsWarper(min_p))
    for w in warpers:
        scores = w(ids, scores)
    return scores[0]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p,scale", [
    (1.0, 0, 1.0, 0.0, 3), (0.7, 40, 1.0, 0.0, 3), (1.3, 0, 0.9, 0.0, 3), (0.8, 0, 1.0, 0.1, 3),
    (0.8, 40, 0.95, 0.05, 3), (2.0, 5, 0.5, 0.2, 3), (0.5, 1000, 0.99, 0.0, 3),
    (1.0, 0, 0.9, 0.0, 0.5), (1.0, 0, 0.5, 0.05, 8),  # a flat distribution: the nucleus needs the full sort
])
def test_filters_match_transformers(temperature, top_k, top_p, min_p, scale):
    g = torch.Generator().manual_seed(int(temperature * 100 + top_k + top_p * 10))
    logits = torch.randn(5000, generator=g) * scale
    idx, vals = filter_logits(logits, temperature, top_k, top_p, min_p)
    ref = _hf_filtered(logits, temperature, top_k, top_p, min_p)
    keep = torch.isfinite(ref)
    assert set(idx.tolist()) == set(torch.nonzero(keep)[:, 0].tolist())
    torch.testing.assert_close(vals, ref[idx])
    if top_k or top_p < 1 or min_p:
        assert (vals[:-1] >= vals[1:]).all()  # sorted, best first


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    logits = torch.randn(300, generator=torch.Generator().manual_seed(1))
    history = [5, 17, 17, 299, 0, 5, 42]
    ours = PenaltyProcessor(1.3, 0.0, 0.0, -1)(history, logits.clone())
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), logits[None].clone())[0]
    torch.testing.assert_close(ours, ref)


def test_presence_frequency_and_window():
    logits = torch.zeros(10)
    out = PenaltyProcessor(1.0, 0.5, 0.25, 3)([1, 2, 2, 3, 3, 3], logits.clone())
    # Window = last 3 tokens: [3, 3, 3]; only token 3 is penalised: 3 * 0.25 + 0.5.
    expected = torch.zeros(10)
    expected[3] = -1.25
    torch.testing.assert_close(out, expected)
    assert PenaltyProcessor.from_params(SamplingParams(repeat_penalty=1.5, repeat_last_n=0)) is None


def test_greedy_is_argmax_after_penalties():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    s = Sampler(SamplingParams(temperature=0.0))
    assert s(logits, [1]).id == 1
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=1.5))
    assert s(logits, [1]).id == 2  # 3.0 / 1.5 = 2.0 < 2.9
    assert math.isclose(s(logits, [1]).logprob, float(torch.log_softmax(logits, 0)[2]), rel_tol=1e-6)


def test_seeded_sampling_reproducible_and_seed_dependent():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))

    def draw(seed):
        s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed))
        return [s(logits, []).id for _ in range(50)]

    assert draw(123) == draw(123)
    assert draw(123) != draw(124)


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0))
    counts = torch.bincount(torch.tensor([s(logits, []).id for _ in range(4000)]), minlength=4).float() / 4000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    # top_k=2 never yields the two unlikely tokens; top_p=0.45 always the first.
    s = Sampler(SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=0))
    assert {s(logits, []).id for _ in range(200)} == {0, 1}
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.45, min_p=0.0, seed=0))
    assert {s(logits, []).id for _ in range(50)} == {0}


def test_top_logprobs_reported_from_the_raw_distribution():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    lp = torch.log_softmax(logits, 0)
    sample = Sampler(SamplingParams(temperature=0.0, logprobs=3))(logits, [])
    ids = torch.argsort(lp, descending=True)[:3].tolist()
    assert [i for i, _ in sample.top_logprobs] == ids
    assert all(math.isclose(v, float(lp[i]), rel_tol=1e-6) for i, v in sample.top_logprobs)
    assert Sampler(SamplingParams(temperature=0.0))(logits, []).top_logprobs is None


def test_processor_hook_can_mask_everything_but_one():
    def only_seven(ids, logits):
        logits[:] = float("-inf")
        logits[7] = 0.0
        return logits

    s = Sampler(SamplingParams(temperature=1.0, seed=1), processors=[only_seven])
    assert {s(torch.randn(20), []).id for _ in range(10)} == {7}
