"""`llamaforge finetune rm|kto|orpo|rs|grpo` and `llamaforge reward` end to end, in-process, on a tiny random
Llama that carries SmolLM2's real vocabulary and chat template (a GGUF file, as users pass one)."""
from __future__ import annotations

import json

import pytest

from llamaforge.cli.main import main


@pytest.fixture(scope="module")
def tiny_chat_gguf(tmp_path_factory, smollm2_gguf):
    from conftest import make_tiny_hf
    from llamaforge.config import ModelConfig
    from llamaforge.formats.gguf import read_gguf
    from llamaforge.formats.gguf_write import write_gguf
    src = read_gguf(smollm2_gguf)
    tok = {k: v for k, v in src.metadata.items() if k.startswith("tokenizer.")}
    types = {k: v for k, v in src.value_types.items() if k in tok}
    src.close()
    m = make_tiny_hf("llama32", vocab_size=len(tok["tokenizer.ggml.tokens"]))
    out = tmp_path_factory.mktemp("tiny") / "tiny-chat.gguf"
    write_gguf(out, ModelConfig.from_hf_config(m.config.to_dict()), m.state_dict(), tokenizer_metadata=tok,
               value_types=types, file_type="f32")
    return out


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prefs(n0, n1):
    return [{"prompt": f"What is {i} plus one?", "chosen": f"{i + 1}.", "rejected": "I refuse to answer."}
            for i in range(n0, n1)]


COMMON = ["--max-steps", "3", "--batch-size", "2", "--lr", "1e-2", "--max-seq-len", "256"]


def test_reward_model_then_reward_command(tmp_path, tiny_chat_gguf, capsys):
    train_f = _jsonl(tmp_path / "train.jsonl", _prefs(0, 8))
    held_f = _jsonl(tmp_path / "held.jsonl", _prefs(8, 12) + [{"prompt": "x", "chosen": "y"}])
    out = tmp_path / "rm"
    assert main(["finetune", "rm", "--model", str(tiny_chat_gguf), "--data", str(train_f), "--out", str(out),
                 *COMMON]) == 0
    assert "saved:" in capsys.readouterr().out
    # A bad record is an error naming the line; --skip-bad skips and counts it.
    assert main(["reward", str(out), "--data", str(held_f)]) == 1
    assert "held.jsonl:5: preference record is missing 'rejected'" in capsys.readouterr().err
    assert main(["reward", str(out), "--data", str(held_f), "--skip-bad", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["pairs"] == 4 and 0.0 <= res["accuracy"] <= 1.0 and res["skipped"] == {"missing": 1}
    assert main(["reward", str(out), "--prompt", "What is 2 plus one?", "--completion", "3."]) == 0
    float(capsys.readouterr().out)
    assert main(["reward", str(tmp_path), "--data", str(held_f)]) == 1
    assert "not a reward model directory" in capsys.readouterr().err
    assert main(["reward", str(out)]) == 2


@pytest.mark.parametrize("task", ["kto", "orpo"])
def test_kto_and_orpo_commands(tmp_path, tiny_chat_gguf, capsys, task):
    f = _jsonl(tmp_path / "p.jsonl", _prefs(0, 4))
    assert main(["finetune", task, "--model", str(tiny_chat_gguf), "--data", str(f), "--out",
                 str(tmp_path / task), *COMMON]) == 0
    assert (tmp_path / task / "adapter_model.safetensors").is_file()
    assert "trained 3 steps" in capsys.readouterr().out


def test_grpo_and_rs_commands(tmp_path, tiny_chat_gguf, capsys):
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {i} plus one?", "answer": str(i + 1)}
                                            for i in range(4)])
    flaky = tmp_path / "flaky.py"
    flaky.write_text("n = [0]\ndef reward(prompt, completion, answer=None):\n    n[0] += 1\n"
                     "    if n[0] == 1:\n        raise KeyError('first call')\n    return float(completion == answer)\n")
    out = tmp_path / "grpo"
    assert main(["finetune", "grpo", "--model", str(tiny_chat_gguf), "--prompts", str(prompts), "--out", str(out),
                 "--reward", str(flaky), "--group", "2", "--max-new-tokens", "4", *COMMON]) == 0
    cap = capsys.readouterr()
    assert "skipped: 1 x reward raised KeyError: 'first call'" in cap.err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "skipped" in rows[0] and {"reward_mean", "reward_std", "kl", "completion_len"} <= set(rows[1])
    out = tmp_path / "rs"
    assert main(["finetune", "rs", "--model", str(tiny_chat_gguf), "--prompts", str(prompts), "--out", str(out),
                 "--scorer", "regex:.+", "--k", "2", "--rounds", "1", "--max-new-tokens", "4", *COMMON]) == 0
    assert "round 1: kept 4/4 prompts" in capsys.readouterr().out
    assert len((out / "round-1" / "kept.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("argv,needle", [
    (["grpo", "--group", "1", "--reward", "exact"], "group_size: must be at least 2"),
    (["grpo", "--group", "4"], "reward: is required for grpo"),
    (["grpo", "--reward", "regex:(["], "does not compile"),
    (["rs", "--scorer", "no-such-thing"], "unknown reward 'no-such-thing'"),
    (["kto", "--batch-size", "1"], "batch_size: must be at least 2 for kto"),
])
def test_cli_bad_input(tmp_path, tiny_chat_gguf, capsys, argv, needle):
    f = _jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "answer": "1"}])
    flag = "--prompts" if argv[0] in ("rs", "grpo") else "--data"
    code = main(["finetune", argv[0], "--model", str(tiny_chat_gguf), flag, str(f), "--out", str(tmp_path / "o"),
                 *argv[1:]])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("Error: ") and needle in err
