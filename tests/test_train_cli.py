"""`llamaforge finetune` end to end in subprocesses: SIGKILL mid-run then --resume, torchrun data parallelism,
merge, and clean errors for bad input."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train_utils import VOCAB

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama saved by transformers (config.json + model.safetensors), no tokenizer."""
    from conftest import make_tiny_hf
    d = tmp_path_factory.mktemp("tiny_hf")
    make_tiny_hf("llama31", vocab_size=VOCAB).save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def pretok(tmp_path_factory):
    """Pre-tokenized records: a prompt (not learned) and a reply (learned), random lengths."""
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("data")
    lines = []
    for _ in range(24):
        p, r = rng.randint(4, 20), rng.randint(4, 30)
        ids = [rng.randrange(8, VOCAB) for _ in range(p + r)]
        lines.append(json.dumps({"input_ids": ids, "mask": [0] * p + [1] * r}))
    f = d / "pretok.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def _cmd(*args):
    return [sys.executable, "-m", "llamaforge", "finetune", *map(str, args)]


def _losses(out: Path):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r]


def _adapter(out: Path):
    from safetensors.torch import load_file
    return load_file(str(out / "adapter_model.safetensors"))


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, hf_dir, pretok):
    common = ["--model", hf_dir, "--data", pretok, "--method", "lora", "--max-steps", 30, "--batch-size", 4,
              "--lr", "5e-3", "--lora-dropout", "0.1", "--save-every", 5, "--warmup-steps", 3, "--seed", 7]
    ref = tmp_path / "ref"
    subprocess.run(_cmd("sft", "--out", ref, *common), check=True, env=ENV, capture_output=True, timeout=300)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd("sft", "--out", out, *common), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "step-000010" / "manifest.json").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists()
    done = subprocess.run(_cmd("sft", "--out", out, "--resume", *common), env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    a, b = _adapter(ref), _adapter(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert _losses(out) == pytest.approx(_losses(ref), abs=1e-6)  # metrics rewound to the checkpoint, no dups


def test_torchrun_two_processes_match_one(tmp_path, hf_dir, pretok):
    """2 gloo processes x batch 2 == 1 process x batch 4 (same global batch).

    Tolerances: losses 1e-5 absolute (summation order differs); weights 1e-3 absolute after 3 AdamW steps of
    lr 1e-2, since Adam's g/sqrt(v) turns float noise in near-zero gradients into up to ~1% of a step.
    """
    common = ["--model", hf_dir, "--data", pretok, "--method", "lora", "--max-steps", 3, "--lr", "1e-2",
              "--seed", 3, "--device", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cmd("sft", "--out", one, "--batch-size", 4, *common), check=True, env=ENV,
                   capture_output=True, timeout=300)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "llamaforge", "finetune", "sft", "--out", str(two), "--batch-size", "2",
                        *map(str, common)], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-5)
    a, b = _adapter(one), _adapter(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-3, rtol=0)
        assert (a[k] - b[k]).abs().mean() < 1e-5


def test_merge_command_and_errors(tmp_path, hf_dir, pretok):
    out = tmp_path / "ad"
    r = subprocess.run(_cmd("sft", "--model", hf_dir, "--data", pretok, "--out", out, "--max-steps", 2,
                            "--lr", "5e-2", "--target-modules", "q_proj,down_proj"), env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    merged = tmp_path / "merged"
    r = subprocess.run(_cmd("merge", "--model", hf_dir, "--adapter", out, "--out", merged), env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    from llamaforge.formats.load import load_model
    from llamaforge.train.lora import apply_adapter
    m = load_model(merged).model
    ref = apply_adapter(load_model(hf_dir), out, merge=False).model
    ids = torch.randint(8, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(m(ids), ref(ids), atol=1e-5, rtol=1e-5)
    gg = tmp_path / "merged.gguf"
    r = subprocess.run(_cmd("merge", "--model", hf_dir, "--adapter", out, "--out", gg, "--gguf-type", "f32"),
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        torch.testing.assert_close(load_model(gg).model(ids), ref(ids), atol=1e-4, rtol=1e-4)
    # Bad input: one clear line, exit 1, no traceback.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2\n')
    r = subprocess.run(_cmd("sft", "--model", hf_dir, "--data", bad, "--out", tmp_path / "x", "--max-steps", 1),
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "bad.jsonl:2: malformed JSON" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(_cmd("sft", "--model", hf_dir, "--data", bad, "--out", tmp_path / "x", "--max-steps", 1,
                            "--lr", "-1"), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "lr" in r.stderr and "Traceback" not in r.stderr


def test_finetune_prints_log_lines_when_stderr_is_not_a_terminal(tmp_path, hf_dir, pretok):
    """Issue 19: with stderr piped (a log file, CI) the progress bar is off, so each logged step is a plain line
    whose loss is the one written to metrics.jsonl."""
    out = tmp_path / "logged"
    r = subprocess.run(_cmd("sft", "--model", hf_dir, "--data", pretok, "--out", out, "--max-steps", 4,
                            "--log-every", 2, "--lr", "5e-3", "--eval-split", 4), env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert any(line.startswith(f"training 4 steps -> {out}") for line in lines), r.stderr
    steps = [line.split() for line in lines if line.startswith("step ")]
    assert [s[1] for s in steps] == ["2/4", "4/4"], r.stderr
    logged = [float(s[s.index("loss") + 1]) for s in steps]
    assert logged == pytest.approx(_losses(out), abs=1e-4)
    assert all("tok/s" in s for s in steps)
    assert any(line.startswith("eval eval_loss ") for line in lines), r.stderr
