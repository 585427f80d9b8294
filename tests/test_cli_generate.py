"""`llamaforge generate` as a user runs it: a subprocess on the real SmolLM2 model, checked against transformers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_generate_support import smollm2_transformers

PROMPT = "The capital of France is"


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "llamaforge", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=os.environ.copy())


def hf_greedy(n: int):
    import torch
    tok, model = smollm2_transformers()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return ids[0].tolist(), new, tok.decode(new)


def test_greedy_json_equals_transformers():
    # The default in-memory format (packed 4-bit fast path).
    r = cli("generate", "smollm2", PROMPT, "--temperature", "0", "--max-tokens", "16", "--json")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert set(out) == {"text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"}
    prompt_ids, ref, ref_text = hf_greedy(16)
    assert out["token_ids"] == ref and out["text"] == ref_text
    assert out["prompt_tokens"] == len(prompt_ids) and out["completion_tokens"] == 16
    assert out["finish_reason"] == "length"
    assert r.stderr == ""  # no progress output when stderr is not a terminal


def test_float32_streaming_with_stop_equals_transformers():
    _, ref, ref_text = hf_greedy(24)
    mid = len(ref_text) // 2
    stop = ref_text[mid:mid + 6]
    r = cli("generate", "smollm2", PROMPT, "--temperature", "0", "--max-tokens", "24", "--dtype", "float32",
            "--stop", stop)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ref_text[:ref_text.index(stop)] + "\n"


@pytest.mark.parametrize("args,flag", [
    (["--temperature", "-1"], "--temperature"), (["--temperature", "nan"], "--temperature"),
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--max-tokens", "0"], "--max-tokens"),
    (["--min-p", "2"], "--min-p"), (["--top-k", "-3"], "--top-k"), (["--repeat-penalty", "0"], "--repeat-penalty"),
    (["--stop", ""], "--stop"),
])
def test_bad_flags_name_the_flag(args, flag, capsys):
    from llamaforge.cli.main import main
    assert main(["generate", "smollm2", "hi", *args]) == 1
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error:") and flag in err[0], cap.err
    assert cap.out == ""


def test_unknown_model_and_argparse_errors():
    r = cli("generate", "smollm2", "hi", "--temperature", "-1", timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("Error: --temperature") and "Traceback" not in r.stderr
    r = cli("generate", "smollm3", "hi", timeout=60)
    assert r.returncode == 1 and "smollm3" in r.stderr and "llamaforge list" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("generate", "smollm2", "hi", "--max-tokens", "many", timeout=60)
    assert r.returncode == 2 and "--max-tokens" in r.stderr
