"""Meta's Llama 3 tiktoken file, SentencePiece tokenizer.model, HF tokenizer.json; loader sniffing by content."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamaforge.errors import TokenizerError
from llamaforge.tokenizer.gguf_meta import read_gguf_metadata
from llamaforge.tokenizer.load import load_tokenizer
from llamaforge.tokenizer.sentencepiece import SentencePieceTokenizer
from llamaforge.tokenizer.tiktoken import TiktokenTokenizer

CORPUS = [
    "Hello world", " Hello world", "Hello, World! How are you today?", "I'm, you're, we've, DON'T, He'LL",
    "日本語のテキストです。東京は晴れ。", "emoji: 🦙🚀😶‍🌫️✅👍🏽", "def fib(n):\n    return n if n < 2 else fib(n-1)\n",
    "    indented\n\n\n\ttabs\t\tand   spaces   ", "3.14159 2718281828 1234567890 007", "½ ² ٣ Ⅻ",
    "Ünïcödé àçcénts: naïve café", "нещо на Български", "<|begin_of_text|> <|eot_id|> are plain text here",
    "\n\n\n", "   ", "", "a\u00a0b\u2003c\u3000d", "((([[[{{{}}}]]])))",
]
# Meta's pattern, restated here so the reference does not share the implementation's constant.
META_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def llama3(llama3_tokenizer_model):
    return load_tokenizer(llama3_tokenizer_model)


@pytest.fixture(scope="module")
def reference(llama3_tokenizer_model):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    ranks = load_tiktoken_bpe(str(llama3_tokenizer_model))
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
             "<|eot_id|>", "<|python_tag|>"] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]
    return tiktoken.Encoding("meta-llama3", pat_str=META_PATTERN, mergeable_ranks=ranks,
                             special_tokens={n: len(ranks) + i for i, n in enumerate(names)})


def test_llama3_is_tiktoken_with_meta_layout(llama3, reference):
    assert isinstance(llama3, TiktokenTokenizer)
    assert llama3.vocab_size == 128256 == reference.n_vocab
    assert llama3.bos_id == 128000 and llama3.eos_id == 128001
    assert llama3.special_tokens["<|begin_of_text|>"] == 128000
    assert llama3.special_tokens["<|start_header_id|>"] == 128006
    assert llama3.special_tokens["<|eot_id|>"] == 128009
    assert llama3.special_tokens["<|reserved_special_token_246|>"] == 128255
    assert llama3.stop_ids == {128001, 128008, 128009}
    assert llama3.encode("Hello world", add_special=True) == [128000, 9906, 1917]


def test_llama3_encode_decode_equal_tiktoken(llama3, reference):
    for text in CORPUS:
        ids = llama3.encode(text)
        assert ids == reference.encode(text, allowed_special=set(), disallowed_special=()), text
        assert llama3.decode(ids) == reference.decode(ids) == text
    special = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    assert llama3.encode(special, allow_special=True) == reference.encode(special, allowed_special="all")


def test_llama3_gguf_vocab_agrees_with_meta_file(llama3, vocab_dir):
    # Two independent routes: llama.cpp's GGUF of Llama 3 (tokenizers + llama.cpp regex) and Meta's file.
    gguf = load_tokenizer(vocab_dir / "ggml-vocab-llama-bpe.gguf")
    for text in CORPUS:
        assert gguf.encode(text) == llama3.encode(text), text


def test_llama3_long_input_guards(llama3, reference):
    text = " " * 30_000 + "x" * 30_000 + "\n" + "ab " * 3
    ids = llama3.encode(text)
    assert llama3.decode(ids) == text
    # Meta's guard: cut runs of more than 25,000 whitespace / non-whitespace characters, encode the pieces.
    assert ids == _meta_guarded(text, reference)
    assert ids != reference.encode(text, allowed_special=set(), disallowed_special=())  # the guard did cut


def _meta_guarded(text, enc, max_run=25_000):
    out, start, run, space = [], 0, 0, text[0].isspace()
    for i, ch in enumerate(text):
        if ch.isspace() != space:
            space, run = ch.isspace(), 1
        else:
            run += 1
            if run > max_run:
                out.append(text[start:i])
                start, run = i, 1
    out.append(text[start:])
    return [t for piece in out for t in enc.encode(piece, allowed_special=set(), disallowed_special=())]


def test_loader_sniffs_by_content(tmp_path, llama3_tokenizer_model, vocab_dir):
    odd = tmp_path / "vocab.bin"
    odd.write_bytes(Path(llama3_tokenizer_model).read_bytes())
    assert isinstance(load_tokenizer(odd), TiktokenTokenizer)
    # A SentencePiece tokenizer.model, written from the llama-spm GGUF vocabulary.
    from llamaforge.tokenizer.spm_proto import model_proto
    meta = read_gguf_metadata(vocab_dir / "ggml-vocab-llama-spm.gguf")
    spm_file = tmp_path / "spm" / "tokenizer.model"
    spm_file.parent.mkdir()
    spm_file.write_bytes(model_proto(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"],
                                     meta["tokenizer.ggml.token_type"], bos_id=1, eos_id=2))
    sp = load_tokenizer(spm_file.parent)  # a directory works too
    assert isinstance(sp, SentencePieceTokenizer)
    assert (sp.bos_id, sp.eos_id, sp.add_bos) == (1, 2, True)
    gg = load_tokenizer(vocab_dir / "ggml-vocab-llama-spm.gguf")
    for text in CORPUS:
        assert sp.encode(text) == gg.encode(text)
        assert sp.decode(sp.encode(text)) == text
    for name, data, match in [("empty", b"", "empty"), ("junk.model", b"\x00\x01junk", "not a known"),
                              ("bad.model", b"\x0a\x03abc", "SentencePiece"),
                              ("tk.model", b"SGVsbG8= 0\nV29ybGQ= 5\n", "ranks")]:
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(TokenizerError, match=match):
            load_tokenizer(p)
    with pytest.raises(TokenizerError):
        load_tokenizer(tmp_path / "missing.json")
    big = tmp_path / "weights.bin"
    with open(big, "wb") as f:  # sparse: looks like a SentencePiece proto, far too big to be one
        f.write(b"\x0a\x05hello")
        f.truncate(300 << 20)
    with pytest.raises(TokenizerError, match="too large"):
        load_tokenizer(big)
    with pytest.raises(TokenizerError, match="no tokenizer"):
        load_tokenizer(tmp_path / "spm" / "..")  # a directory with nothing usable at top level


# --------------------------------------------------------------------------------------------- tokenizer.json
def _bytelevel_json(smol, directory: Path) -> Path:
    """A SmolLM2-style tokenizer.json + tokenizer_config.json built from the GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders
    tk = Tokenizer.from_str(smol._tk.to_str())
    tk.decoder = decoders.ByteLevel()
    specials = sorted(smol.special_tokens, key=smol.special_tokens.get)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    directory.mkdir(parents=True, exist_ok=True)
    tk.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": False,
        "chat_template": smol.chat_template}))
    return directory / "tokenizer.json"


def test_hf_bytelevel_json_matches_transformers(tmp_path, smollm2_gguf):
    from transformers import PreTrainedTokenizerFast
    smol = load_tokenizer(smollm2_gguf)
    path = _bytelevel_json(smol, tmp_path / "smol")
    ours = load_tokenizer(tmp_path / "smol")
    bom = tmp_path / "bom" / "tokenizer.json"
    bom.parent.mkdir()
    bom.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_tokenizer(bom).encode("Hello 2024") == ours.encode("Hello 2024")
    ref = PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert ours.vocab_size == smol.vocab_size and ours.special_tokens == smol.special_tokens
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (1, 2, False)
    assert ours.chat_template == smol.chat_template
    for text in CORPUS:
        if "<|" in text:
            continue
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False) == smol.encode(text), text
        assert ours.decode(ids) == ref.decode(ids) == text
    text = "<|im_start|>user\nhi<|im_end|>"
    assert ours.encode(text, allow_special=True) == ref.encode(text, add_special_tokens=False)
    assert 2 not in ours.encode(text)


def _spm_style_json(directory: Path) -> Path:
    """A Llama-2-style tokenizer.json (Metaspace, byte fallback, Strip decoder), trained tiny."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    corpus = ["hello world", "the quick brown fox", "hello there friend", "world of words"] * 20
    base.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, show_progress=False))
    spec = json.loads(base.to_str())
    trained = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece, _ in trained:
        vocab.setdefault(piece, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                                                  for m in spec["model"]["merges"]],
                              byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.pre_tokenizer = base.pre_tokenizer
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    from tokenizers import AddedToken
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    directory.mkdir(parents=True, exist_ok=True)
    tk.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                "add_bos_token": True}))
    return directory / "tokenizer.json"


def test_hf_spm_style_json_matches_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast
    path = _spm_style_json(tmp_path / "spm")
    ours = load_tokenizer(path)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert ours.strip_leading_space and ours.add_bos and ours.bos_id == 1
    for text in ["hello world", " hello  world ", "héllo wörld 日本", "fox\nfriend", "🦙 words"]:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert ours.encode(text, add_special=True) == [1] + ids


def test_hf_json_errors(tmp_path):
    cases = {"notjson.json": "{nope", "list.json": "[1, 2]", "nomodel.json": "{}",
             "badadded.json": json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []},
                                          "added_tokens": [{"id": "x"}]}),
             "badmodel.json": json.dumps({"model": {"type": "Nonsense", "vocab": {}}}),
             "emptyvocab.json": json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}})}
    for name, text in cases.items():
        p = tmp_path / name
        p.write_text(text)
        with pytest.raises(TokenizerError):
            load_tokenizer(p)
