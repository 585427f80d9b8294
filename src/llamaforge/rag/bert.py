"""A BERT encoder in plain PyTorch, for sentence-embedding and cross-encoder models (all-MiniLM-L6-v2,
ms-marco cross-encoders) stored as Hugging Face directories with safetensors weights.

Why our own ~150 lines rather than `sentence-transformers`: importing sentence-transformers pulls in
transformers, scikit-learn and scipy (about 17 s of imports on a loaded 2-core machine, before the first query),
while this needs only torch, safetensors and tokenizers, which llamaforge already depends on. The numbers are the
same as sentence-transformers' (tests/test_rag_embed.py checks them against it).

Architecture (BERT, Devlin et al. 2018): word + position + token-type embeddings, LayerNorm; N post-norm layers of
multi-head self-attention and a GELU feed-forward block; for a sequence classifier, a tanh pooler on the [CLS]
token and a linear classifier.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._fs import read_bounded, loads_json
from ..errors import ModelFormatError

MAX_CONFIG_BYTES = 1 << 20
_ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


@dataclass(frozen=True)
class BertConfig:
    """The architecture numbers of a BERT model (Hugging Face `config.json` names in `from_hf`)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    num_labels: int = 0           # > 0: a sequence classifier (cross-encoder) head is present

    @classmethod
    def from_hf(cls, cfg: dict, path=None) -> "BertConfig":
        if cfg.get("model_type") not in ("bert", None):
            raise ModelFormatError(path, f"model_type {cfg.get('model_type')!r} is not supported (BERT only)")
        try:
            c = cls(vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
                    num_layers=int(cfg["num_hidden_layers"]), num_heads=int(cfg["num_attention_heads"]),
                    intermediate_size=int(cfg["intermediate_size"]),
                    max_positions=int(cfg["max_position_embeddings"]),
                    type_vocab_size=int(cfg.get("type_vocab_size", 2)),
                    layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
                    hidden_act=str(cfg.get("hidden_act", "gelu")))
        except KeyError as e:
            raise ModelFormatError(path, f"config.json lacks {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelFormatError(path, f"config.json has a bad value: {e}") from None
        if c.position_embedding_type(cfg) != "absolute":
            raise ModelFormatError(path, "only absolute position embeddings are supported")
        if c.hidden_act not in _ACTIVATIONS:
            raise ModelFormatError(path, f"hidden_act {c.hidden_act!r} is not supported")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions"):
            if not 0 < getattr(c, name) <= 1 << 20:
                raise ModelFormatError(path, f"config.json: {name} = {getattr(c, name)} is out of range")
        if c.hidden_size % c.num_heads:
            raise ModelFormatError(path, "hidden_size is not a multiple of num_attention_heads")
        return c

    @staticmethod
    def position_embedding_type(cfg: dict) -> str:
        return str(cfg.get("position_embedding_type", "absolute"))


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        h = c.hidden_size
        self.q, self.k, self.v, self.o = (nn.Linear(h, h) for _ in range(4))
        self.attn_norm = nn.LayerNorm(h, eps=c.layer_norm_eps)
        self.up = nn.Linear(h, c.intermediate_size)
        self.down = nn.Linear(c.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=c.layer_norm_eps)
        self.heads = c.num_heads
        self.act = _ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        split = lambda t: t.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # noqa: E731 [B,H,T,D]
        att = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                             attn_mask=keep)                     # keep: [B,1,1,T] bool
        x = self.attn_norm(x + self.o(att.transpose(1, 2).reshape(B, T, C)))     # post-norm, as BERT
        return self.ffn_norm(x + self.down(self.act(self.up(x))))


class Bert(nn.Module):
    """BERT encoder; `forward` -> last hidden states [B,T,H]; `classify` -> logits [B,num_labels] (cross-encoder)."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.config = c
        self.word = nn.Embedding(c.vocab_size, c.hidden_size)
        self.pos = nn.Embedding(c.max_positions, c.hidden_size)
        self.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.emb_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(c) for _ in range(c.num_layers))
        if c.num_labels:
            self.pooler = nn.Linear(c.hidden_size, c.hidden_size)
            self.classifier = nn.Linear(c.hidden_size, c.num_labels)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        T = ids.shape[1]
        types = torch.zeros_like(ids) if types is None else types
        x = self.word(ids) + self.pos(torch.arange(T, device=ids.device))[None] + self.token_type(types)
        x = self.emb_norm(x)
        keep = mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, keep)
        return x

    def classify(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        h = self.forward(ids, mask, types)
        return self.classifier(torch.tanh(self.pooler(h[:, 0])))


# Hugging Face parameter names -> ours. Checkpoints saved from BertForSequenceClassification carry "bert.".
_RENAMES = [
    (r"embeddings\.word_embeddings\.", "word."), (r"embeddings\.position_embeddings\.", "pos."),
    (r"embeddings\.token_type_embeddings\.", "token_type."), (r"embeddings\.LayerNorm\.", "emb_norm."),
    (r"encoder\.layer\.(\d+)\.attention\.self\.query\.", r"layers.\1.q."),
    (r"encoder\.layer\.(\d+)\.attention\.self\.key\.", r"layers.\1.k."),
    (r"encoder\.layer\.(\d+)\.attention\.self\.value\.", r"layers.\1.v."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.o."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attn_norm."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.up."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.down."),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.ffn_norm."),
    (r"pooler\.dense\.", "pooler."), (r"classifier\.", "classifier."),
]
_IGNORED = re.compile(r"(embeddings\.position_ids|.*\.num_batches_tracked)$")


def our_name(hf_name: str) -> str | None:
    """Our parameter name for a Hugging Face BERT tensor name (None for buffers we do not keep)."""
    name = hf_name[5:] if hf_name.startswith("bert.") else hf_name
    if _IGNORED.fullmatch(name):
        return None
    name = name.replace(".gamma", ".weight").replace(".beta", ".bias")   # very old checkpoints
    for pattern, repl in _RENAMES:
        new, n = re.subn("^" + pattern, repl, name)
        if n:
            return new
    return "?" + hf_name


def read_json(path: Path, what: str) -> dict:
    try:
        data = loads_json(read_bounded(path, MAX_CONFIG_BYTES, what))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFormatError(path, f"{what} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(path, f"{what} must be a JSON object")
    return data


def load_bert(model_dir: Path, *, classifier: bool = False) -> Bert:
    """Build a `Bert` from an HF directory (config.json + model.safetensors). No pickle files are read."""
    from safetensors import SafetensorError, safe_open
    model_dir = Path(model_dir)
    cfg = read_json(model_dir / "config.json", "config.json")
    c = BertConfig.from_hf(cfg, model_dir)
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise ModelFormatError(model_dir, "no model.safetensors (pickled .bin weights are not loaded)")
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights), "pt") as f:
            for k in f.keys():
                name = our_name(k)
                if name is not None:
                    state[name] = f.get_tensor(k)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ModelFormatError(weights, f"cannot read safetensors: {e}") from None
    if classifier:
        if "classifier.weight" not in state:
            raise ModelFormatError(model_dir, "not a sequence classifier (no classifier weights)")
        c = BertConfig(**{**c.__dict__, "num_labels": int(state["classifier.weight"].shape[0])})
    else:
        state = {k: v for k, v in state.items() if not k.startswith(("pooler.", "classifier."))}
    unknown = sorted(k[1:] for k in state if k.startswith("?"))
    if unknown:
        raise ModelFormatError(weights, f"unexpected tensor {unknown[0]!r} for a BERT model")
    with torch.device("meta"):
        model = Bert(c)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, shape in expected.items():
        if k not in state:
            raise ModelFormatError(weights, f"missing tensor for {k!r}")
        if tuple(state[k].shape) != shape:
            raise ModelFormatError(weights, f"tensor {k!r} has shape {tuple(state[k].shape)}, expected {shape}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return model.eval()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors that are not padding: [B,T,H], [B,T] -> [B,H]."""
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "mean":
        return mean_pool(hidden, mask)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(~mask.bool()[..., None], -math.inf).amax(1)
    raise ValueError(mode)
