"""`llamaforge serve` as a real process: /health 503 while the model loads then 200, the API key from the
environment, and SIGTERM ending an open stream with a final event before the process exits cleanly."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

KEY = "env-key-456"


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_serve_unknown_model_fails_fast():
    r = subprocess.run([sys.executable, "-m", "llamaforge", "serve", "no-such-model-xyz", "--port",
                        str(_free_port())], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Error: model 'no-such-model-xyz' not found" in r.stderr


def test_serve_exits_with_the_error_when_a_named_file_cannot_load(tmp_path):
    bad = tmp_path / "README.md"
    bad.write_text("# not a model\n")
    r = subprocess.run([sys.executable, "-m", "llamaforge", "serve", str(bad), "--port", str(_free_port())],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "Error: failed to load" in r.stderr and "README.md" in r.stderr and "Traceback" not in r.stderr


def test_a_model_served_by_path_gets_a_clean_name(smollm2_gguf):
    from llamaforge.server.models import ModelManager

    class Lm:
        name = None
    assert ModelManager._entry_name(str(smollm2_gguf), Lm()) == "smollm2-135m-instruct.q4_1"
    Lm.name = "library/smollm2:latest"
    assert ModelManager._entry_name("smollm2", Lm()) == "smollm2"


def test_serve_health_key_and_sigterm(smollm2_gguf):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, LLAMAFORGE_API_KEY=KEY, OMP_NUM_THREADS="2")
    proc = subprocess.Popen([sys.executable, "-m", "llamaforge", "serve", "smollm2", "--port", str(port),
                             "--ctx", "256", "--max-batch", "2", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                r = httpx.get(url + "/health", timeout=5)  # no key needed for /health
            except httpx.HTTPError:
                time.sleep(0.05)
                continue
            seen.append((r.status_code, r.json()["status"]))
            if r.status_code == 200:
                break
            time.sleep(0.05)
        assert seen[-1] == (200, "ok")
        assert (503, "loading") in seen  # the port answers while the weights are still loading
        assert httpx.get(url + "/v1/models").status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(url + "/v1/models", headers=auth).json()["data"][0]["id"] == "smollm2"

        body = {"model": "smollm2", "messages": [{"role": "user", "content": "Write a long story."}],
                "max_tokens": 200, "temperature": 0, "stream": True}
        lines = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=auth, timeout=60) as resp:
            it = resp.iter_lines()
            for line in it:
                lines.append(line)
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break
            proc.send_signal(signal.SIGTERM)
            lines += list(it)
        data = [x for x in lines if x.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        # The stream says it was cut by the shutdown (issue 17), not a normal-looking "stop".
        assert json.loads(data[-2][6:])["error"]["code"] == "shutting_down"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
