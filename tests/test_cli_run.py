"""`llamaforge run`: one-shot answers and the interactive REPL through a pseudo-terminal (pexpect)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pexpect

from llamaforge.cli.run import read_message
from llamaforge.model.llama import ATTENTION_BLOCK


def run_cli(*args, stdin: str | None = None, timeout=300):
    return subprocess.run([sys.executable, "-m", "llamaforge", "run", *args], capture_output=True, text=True,
                          input=stdin if stdin is not None else "", timeout=timeout, env=os.environ.copy())


def test_empty_stdin_answers_the_demo_prompt_and_exits_0():
    r = run_cli(stdin="")
    assert r.returncode == 0, r.stderr
    answer = r.stdout.strip().lower()
    assert len(answer.split()) >= 8 and "sky" in answer and ("light" in answer or "scatter" in answer), answer
    assert r.stderr == ""  # no loading messages without a terminal


def test_prompt_from_stdin_and_from_argument():
    r = run_cli("smollm2", "--temperature", "0", "--max-tokens", "12", "--dtype", "float32",
                stdin="What is the capital of France?\n")
    assert r.returncode == 0 and "Paris" in r.stdout, (r.stdout, r.stderr)
    r = run_cli("smollm2", "Bad", "--top-p", "7")
    assert r.returncode == 1 and "--top-p" in r.stderr and "Traceback" not in r.stderr


def test_read_message_multiline(monkeypatch):
    lines = iter(['"""', "first line", 'second line"""'])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert read_message() == "first line\nsecond line"
    lines2 = iter(['"""one line"""'])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines2))
    assert read_message() == "one line"


def _stats(child) -> tuple[int, int, int]:
    """(prompt tokens, prompt tokens reused from the cache, generated tokens) from the verbose statistics."""
    child.expect(r"prompt eval count:\s+(\d+) token\(s\), (\d+) reused")
    n_prompt, reused = int(child.match.group(1)), int(child.match.group(2))
    child.expect(r"\neval count:\s+(\d+)")
    return n_prompt, reused, int(child.match.group(1))


def test_repl_two_turns_clear_and_ctrl_c():
    env = {**os.environ, "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, ["-m", "llamaforge", "run", "smollm2", "--temperature", "0",
                                           "--max-tokens", "30"], env=env, encoding="utf-8", timeout=240,
                          dimensions=(40, 200))
    try:
        child.expect_exact(">>> ")
        child.sendline("/set verbose")
        child.expect_exact("Set 'verbose' mode.")
        child.expect_exact(">>> ")
        child.sendline("My name is Ada. Please remember it.")
        n1, r1, e1 = _stats(child)
        assert r1 == 0
        child.expect_exact(">>> ")
        # Second turn: the prompt sent to the model holds the first turn and its answer.
        child.sendline('"""')
        child.sendline("What is")
        child.sendline('my name?"""')
        n2, r2, e2 = _stats(child)
        assert n2 >= n1 + e1, (n1, e1, n2)
        # The first turn's prompt keys/values are reused in whole blocks (the deterministic engine reuses only
        # 64-token blocks computed by a prompt prefill: keys computed while generating round differently).
        assert r2 % ATTENTION_BLOCK == 0 and r2 <= n1, (n1, r2)
        child.expect_exact(">>> ")
        child.sendline("/clear")
        child.expect_exact("Cleared session context")
        child.expect_exact(">>> ")
        child.sendline("What is my name?")
        n3, r3, _ = _stats(child)
        assert n3 < n1 + 5 and n3 < n2 - e1, (n1, n2, n3)
        # Only the system prompt is shared with the cached conversation, so at most its whole blocks are reused.
        assert r3 % ATTENTION_BLOCK == 0 and r3 < n3 and r3 <= r2, (r2, r3, n3)
        child.expect_exact(">>> ")
        # Ctrl-C in the middle of a long answer stops it and returns to the prompt (no stats printed).
        child.sendline("/set parameter num_predict 2000")
        child.expect_exact("Set parameter 'num_predict' to '2000'")
        child.expect_exact(">>> ")
        child.sendline("/set parameter ignore_eos true")  # the answer cannot end before Ctrl-C arrives
        child.expect_exact(">>> ")
        child.sendline("Write a very long story about a dragon and a knight.")
        child.expect_exact("knight.")                       # the echo of our line
        child.expect(re.compile(r"\w+\W+\w+\W+\w+\W+\w+"))  # some of the answer has streamed
        child.sendintr()
        child.expect_exact(">>> ", timeout=120)
        assert "eval count" not in child.before
        # Ctrl-C over half-typed text discards it and gives a fresh prompt.
        child.send("half typed")
        child.expect_exact("typed")
        child.sendintr()
        child.expect_exact(">>> ")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, (child.exitstatus, child.signalstatus)
    # readline history was saved (atomically) in the store directory.
    history = open(os.path.join(os.environ["LLAMAFORGE_HOME"], "history"), encoding="utf-8").read()
    assert "My name is Ada." in history
