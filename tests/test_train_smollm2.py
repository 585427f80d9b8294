"""Slow end-to-end check on a real model: LoRA SFT teaches SmolLM2-135M the fictional Quorvath facts.

Held-out questions are paraphrases never seen in training; exact match (normalised first line) must go from
near zero to >= 80%. Runs bench/train_bench.py's accuracy experiment in-process (several minutes on 2 cores).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "train_bench.py"


@pytest.mark.slow
def test_lora_sft_teaches_smollm2_heldout_facts(tmp_path, smollm2_gguf):
    spec = importlib.util.spec_from_file_location("train_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import argparse
    import os
    # Two threads on an idle 2-core machine; one when it is shared (oversubscribed BLAS threads crawl).
    busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    args = argparse.Namespace(out=tmp_path, threads=1 if busy else 2, epochs=5, lr=1e-3, batch_size=8)
    result = bench.run_accuracy(args)
    assert result["exact_match_before"] <= 0.1
    assert result["exact_match_after"] >= 0.8, result["predictions_after"]


def test_normalize_for_exact_match():
    spec = importlib.util.spec_from_file_location("train_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.normalize("The brindle.\nmore") == bench.normalize("brindle") == "brindle"
    assert bench.normalize("Admiral Ysolde Marr!") == "admiral ysolde marr"
    assert bench.normalize("") == "" and bench.normalize("17.") == "17"
