"""Ollama parity through the official `ollama` client: /api/tags details and full digests for every model, one
name form, keep_alive 0 unloads, num_ctx per model and per request, Ollama's option names in errors, /api/create
with the Modelfile's fields. One real model (SmolLM2) is loaded once; store models "load" as copies of it that
carry their own manifest defaults, so on-demand loading and unloading are exercised without reloading weights."""
from __future__ import annotations

import dataclasses
import hashlib
import re

import httpx
import pytest

from llamaforge.server.app import ServerConfig, create_app
from test_server_e2e import Running

HEX64 = re.compile(r"[0-9a-f]{64}")


@pytest.fixture(scope="module")
def base_lm(smollm2_gguf):
    import llamaforge
    return llamaforge.load(str(smollm2_gguf), compile=False)


def _store_loader(base):
    """Load a store model as the manager would (its manifest's defaults), sharing the one set of weights."""
    def load(name):
        from llamaforge.store import Store
        ref = Store().resolve(name)
        return dataclasses.replace(base, name=ref.name, defaults=dict(ref.defaults))
    return load


@pytest.fixture()
def server(base_lm, smollm2_gguf):
    served = dataclasses.replace(base_lm, name=None, defaults={})   # served by path, as `serve FILE.gguf`
    app = create_app(ServerConfig(max_batch=2, ctx=256), loader=_store_loader(base_lm),
                     preloaded={"smollm2-135m-instruct.q4_1": served})
    r = Running(app)
    yield r
    r.stop()


def _client(server):
    import ollama
    return ollama.Client(host=server.url, timeout=120)


def _gguf_reference(path):
    """Parameter count and file type of a GGUF by llama.cpp's own reader (gguf-py)."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    n = sum(int(t.n_elements) for t in reader.tensors if t.name != "rope_freqs.weight")
    ft = int(reader.fields["general.file_type"].parts[-1][0])
    return n, gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_")


# ------------------------------------------------------------------------------------------------------ tags
def test_tags_give_details_and_full_digests_for_every_model_loaded_or_not(server, smollm2_gguf, tmp_path):
    from test_store import tiny_hf_dir
    from llamaforge.store import Store
    c = _client(server)
    hf = tiny_hf_dir(tmp_path / "hf")
    Store().pull(tmp_path / "hf", "tiny-hf")
    c.create(model="pirate", from_="smollm2", system="You are a pirate.")
    c.copy("pirate", "team/pirate:v2")
    rows = {m.model: m for m in c.list().models}
    assert set(rows) == {"smollm2:latest", "pirate:latest", "team/pirate:v2", "tiny-hf:latest",
                         "smollm2-135m-instruct.q4_1:latest"}
    n, ftype = _gguf_reference(smollm2_gguf)
    assert ftype == "Q4_1"
    for name in ("smollm2:latest", "pirate:latest", "smollm2-135m-instruct.q4_1:latest"):
        d = rows[name].details
        assert d.quantization_level == ftype and d.format == "gguf" and d.family == "llama", name
        assert d.parameter_size == f"{n / 1e6:.2f}M", name          # Ollama prints 134.52M
    tiny = rows["tiny-hf:latest"].details
    assert tiny.format == "hf" and tiny.quantization_level == "F32"
    assert tiny.parameter_size == f"{hf.num_parameters() / 1e3:.0f}K"
    for m in rows.values():
        assert HEX64.fullmatch(m.digest), m
    # the same model under two names has one digest; another system prompt makes another model
    assert rows["pirate:latest"].digest == rows["team/pirate:v2"].digest != rows["smollm2:latest"].digest
    # a model served from a path has no manifest: its digest is the file's sha256
    assert rows["smollm2-135m-instruct.q4_1:latest"].digest == hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    # `llamaforge list` prints the first 12 digits as the ID, as `ollama list` does
    ids = {e.name: e.id for e in Store().list()}
    assert ids["pirate:latest"] == rows["pirate:latest"].digest[:12]


def test_one_name_form_in_tags_ps_and_show(server):
    c = _client(server)
    c.generate(model="SmolLM2")                        # load it (any spelling of the name)
    ps = {m.model: m for m in c.ps().models}
    assert set(ps) == {"smollm2:latest", "smollm2-135m-instruct.q4_1:latest"}
    assert all(m.name == m.model for m in ps.values())
    assert HEX64.fullmatch(ps["smollm2:latest"].digest)
    assert ps["smollm2:latest"].digest == {m.model: m for m in c.list().models}["smollm2:latest"].digest
    assert ps["smollm2:latest"].details.quantization_level == "Q4_1"
    assert "FROM smollm2:latest\n" in c.show("smollm2").modelfile
    assert "FROM smollm2-135m-instruct.q4_1:latest\n" in c.show("smollm2-135m-instruct.q4_1").modelfile
    # show works for a model that is not loaded, from its header
    c.create(model="quiet", from_="smollm2", parameters={"temperature": 0.1})
    s = c.show("quiet")
    assert s.modelinfo["general.parameter_count"] > 1e8 and s.details.quantization_level == "Q4_1"
    assert "quiet:latest" not in {m.model for m in c.ps().models}


# ------------------------------------------------------------------------------------------------ keep_alive
def _loaded(c) -> set[str]:
    return {m.model for m in c.ps().models}


def test_keep_alive_zero_unloads_after_the_request(server):
    c = _client(server)
    msgs = [{"role": "user", "content": "Hi"}]
    r = c.chat(model="smollm2", messages=msgs, keep_alive=0, options={"num_predict": 2})
    assert r.done and r.eval_count >= 1
    assert "smollm2:latest" not in _loaded(c)
    parts = list(c.chat(model="smollm2", messages=msgs, stream=True, keep_alive=0, options={"num_predict": 2}))
    assert parts[-1].done and "smollm2:latest" not in _loaded(c)
    c.generate(model="smollm2", prompt="Hi", options={"num_predict": 1})     # default keep_alive: stays
    assert "smollm2:latest" in _loaded(c)
    e = c.embed(model="smollm2", input="hello", keep_alive=0)
    assert len(e.embeddings) == 1 and "smollm2:latest" not in _loaded(c)
    c.generate(model="smollm2")                                             # an empty request loads...
    assert "smollm2:latest" in _loaded(c)
    g = c.generate(model="smollm2", keep_alive=0)                           # ...and with keep_alive 0 unloads
    assert g.done_reason == "unload" and "smollm2:latest" not in _loaded(c)
    # a model named when the server started stays; the answer says so instead of pretending
    import ollama
    with pytest.raises(ollama.ResponseError) as ei:
        c.generate(model="smollm2-135m-instruct.q4_1", keep_alive=0)
    assert ei.value.status_code == 400 and "named when the server started" in str(ei.value)


# ---------------------------------------------------------------------------------------------------- num_ctx
def test_num_ctx_per_model_and_per_request(server, base_lm):
    import ollama
    c = _client(server)
    c.create(model="short", from_="smollm2", parameters={"num_ctx": 48, "num_predict": 4})
    assert "PARAMETER num_ctx" in c.show("short").modelfile
    c.generate(model="short")
    assert {m.model: m.context_length for m in c.ps().models}["short:latest"] == 48
    long_text = "one two three four five six seven eight nine ten " * 8
    n_prompt = len(base_lm.tokenizer.encode(long_text))
    assert 48 < n_prompt < 256
    with pytest.raises(ollama.ResponseError) as ei:
        c.chat(model="short", messages=[{"role": "user", "content": long_text}])
    assert ei.value.status_code == 400 and "context window is 48" in str(ei.value)
    ok = c.chat(model="smollm2", messages=[{"role": "user", "content": long_text}], options={"num_predict": 1})
    assert ok.done                                                         # the same prompt fits the base model
    with pytest.raises(ollama.ResponseError) as ei:                        # per request
        c.chat(model="smollm2", messages=[{"role": "user", "content": long_text}], options={"num_ctx": 32})
    assert ei.value.status_code == 400 and "context window is 32" in str(ei.value)
    with pytest.raises(ollama.ResponseError) as ei:
        c.create(model="bad", from_="smollm2", parameters={"num_ctx": 0})
    assert "num_ctx" in str(ei.value)


# ----------------------------------------------------------------------------------------- Ollama option names
@pytest.mark.parametrize("options, name", [({"num_predict": 0}, "options.num_predict"),
                                           ({"temperature": -1}, "options.temperature"),
                                           ({"top_p": 5}, "options.top_p"),
                                           ({"num_ctx": 0}, "options.num_ctx"),
                                           ({"mirostat": 1}, "options.mirostat")])
def test_errors_name_ollama_options(server, options, name):
    import ollama
    c = _client(server)
    with pytest.raises(ollama.ResponseError) as ei:
        c.chat(model="smollm2", messages=[{"role": "user", "content": "Hi"}], options=options)
    assert ei.value.status_code == 400 and name in str(ei.value) and "max_tokens" not in str(ei.value)


def test_stored_parameters_are_named_as_ollama_names_them(server):
    import ollama
    c = _client(server)
    with pytest.raises(ollama.ResponseError) as ei:
        c.create(model="bad", from_="smollm2", parameters={"num_predict": 0})
    assert "num_predict must be >= 1" in str(ei.value) and "max_tokens" not in str(ei.value)
    c.create(model="brief", from_="smollm2", parameters={"num_predict": 3, "stop": ["\n\n"]})
    s = c.show("brief")
    assert re.search(r"^num_predict\s+3$", s.parameters, re.M) and "max_tokens" not in s.modelfile


# ------------------------------------------------------------------------------------------------ /api/create
def test_api_create_takes_the_modelfile_fields(server, base_lm):
    import ollama
    from llamaforge.generate.pipeline import plan
    from llamaforge.generate.request import GenerationRequest
    c = _client(server)
    shots = [{"role": "user", "content": "Say a colour."}, {"role": "assistant", "content": "Teal."}]
    st = c.create(model="shots", from_="smollm2", system="Answer in one word.", messages=shots,
                  license=["MIT License", "Second notice"], parameters={"temperature": 0, "num_predict": 3})
    assert st.status == "success"
    s = c.show("shots")
    assert s.license == "MIT License\n\nSecond notice"
    assert 'MESSAGE user """Say a colour."""' in s.modelfile and 'MESSAGE assistant """Teal."""' in s.modelfile
    assert 'LICENSE """MIT License' in s.modelfile
    # the few-shot turns reach the prompt through the seam, after the system prompt, before the user's turn
    r = c.chat(model="shots", messages=[{"role": "user", "content": "Another."}])
    explicit = [{"role": "system", "content": "Answer in one word."}, *shots, {"role": "user", "content": "Another."}]
    ref = plan(base_lm, GenerationRequest(messages=explicit))
    assert r.prompt_eval_count == len(ref.prompt_ids)
    bare = plan(base_lm, GenerationRequest(messages=[{"role": "user", "content": "Another."}]))
    assert len(bare.prompt_ids) < len(ref.prompt_ids)
    # a Go template is refused with a clear message rather than mis-rendered; so are unsupported fields
    with pytest.raises(ollama.ResponseError) as ei:
        c.create(model="go", from_="smollm2", template="{{ if .System }}{{ .System }}{{ end }}{{ .Prompt }}")
    assert ei.value.status_code == 400 and "Go template" in str(ei.value) and "Jinja" in str(ei.value)
    c.create(model="jinja", from_="smollm2",
             template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
    assert c.show("jinja").template.startswith("{% for m in messages %}")
    for kw, field in (({"quantize": "q4_0"}, "quantize"), ({"files": {"x.gguf": "sha256:" + "0" * 64}}, "files"),
                      ({"adapters": {"a.safetensors": "sha256:" + "0" * 64}}, "adapters")):
        with pytest.raises(ollama.ResponseError) as ei:
            c.create(model="x", from_="smollm2", **kw)
        assert ei.value.status_code == 400 and f"'{field}'" in str(ei.value)
    with pytest.raises(ollama.ResponseError) as ei:
        c.create(model="x", from_="smollm2", messages=[{"role": "tool", "content": "x"}])
    assert ei.value.status_code == 400 and "messages[0].role" in str(ei.value)
    assert httpx.post(server.url + "/api/create", json={"model": "x", "from": "../../etc/passwd"}).status_code == 400
