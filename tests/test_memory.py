"""What loading and running the default fast path costs in memory and imports (bench/run.py reports the figures
against llama.cpp; these tests keep regressions out: e.g. an import of torch's compiler adds ~150 MB)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

HEAVY = ("transformers", "jinja2", "torch._dynamo", "torch._inductor", "sympy", "gguf", "fastapi", "peft")


def test_load_prefill_decode_stays_lean(smollm2_gguf, tmp_path):
    code = (
        "import json, sys, resource, torch\n"
        "torch.set_num_threads(2)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "import llamaforge\n"
        "from llamaforge.generate.engine import BatchEngine\n"
        "from llamaforge.generate.sampling import SamplingParams\n"
        "lm = llamaforge.load(sys.argv[1])\n"
        "engine = BatchEngine(lm, max_batch=1, max_seq_len=1024)\n"
        "req = engine.add(list(range(1000, 1512)), SamplingParams(max_tokens=16, temperature=0))\n"
        "while engine.has_work():\n    engine.step()\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'torch_kb': base, 'peak_kb': peak, 'tokens': len(req.output_ids),\n"
        "                  'modules': sorted(m for m in sys.modules)}))\n")
    env = dict(os.environ, LLAMAFORGE_HOME=str(tmp_path), LLAMAFORGE_COMPILE="0")
    r = subprocess.run([sys.executable, "-c", code, str(smollm2_gguf)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["tokens"] == 16
    heavy = [m for m in out["modules"] if m.split(".")[0] in HEAVY or m.startswith(HEAVY)]
    assert not heavy, heavy
    # Measured ~175 MB above `import torch` (90 MB packed weights, 22 MB cache, tokenizer, prefill buffers);
    # llama.cpp's whole process is ~203 MB. The bound has headroom for other allocators, not for a 2nd copy.
    grown_mb = (out["peak_kb"] - out["torch_kb"]) / 1024
    assert grown_mb < 230, grown_mb
    print(f"peak {grown_mb:.0f} MB above import torch")


def test_file_type_names_match_the_gguf_reference():
    """Our table of llama.cpp file types (read without importing the gguf package) against gguf's enum."""
    from gguf import LlamaFileType

    from llamaforge.formats.gguf import FILE_TYPES
    for ft in LlamaFileType:
        if ft.name == "GUESSED":
            continue
        assert FILE_TYPES.get(ft.value) == ft.name.replace("MOSTLY_", "").replace("ALL_", ""), ft
