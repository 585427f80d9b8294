"""`llamaforge` entry point: one command, subcommands imported lazily (each module owns `main(argv) -> int`)."""
from __future__ import annotations

import importlib
import sys

# name -> (module under llamaforge.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run", "chat with a model interactively (default model: smollm2)"),
    "generate": ("generate", "raw completion of a prompt, no chat template"),
    "serve": ("serve", "HTTP server speaking the OpenAI and Ollama APIs"),
    "list": ("store_cmds", "list models in the local store"),
    "show": ("store_cmds", "show a model's architecture, quantization, template, license, path"),
    "rm": ("store_cmds", "remove a model from the store"),
    "pull": ("store_cmds", "add a model from a local file/directory or a Hugging Face repo id"),
    "create": ("store_cmds", "create a model from a Modelfile (-f) or another model: system, parameters, adapter..."),
    "cp": ("store_cmds", "copy a model under a new name"),
    "ps": ("server_cmds", "list models loaded in a running server and background compiled-step builds"),
    "stop": ("server_cmds", "unload a model from a running server"),
    "embed": ("embed", "print embedding vectors of texts (as /api/embed computes them)"),
    "convert": ("convert", "convert a model to a Hugging Face directory or GGUF"),
    "tokenize": ("tokenize", "print the token ids of a text"),
    "finetune": ("finetune", "fine-tune (SFT full/LoRA/QLoRA, DPO, KTO, ORPO, reward model, RS, GRPO), merge"),
    "reward": ("reward", "score preference pairs with a reward model (pairwise accuracy)"),
    "compile": ("compile", "build a model's compiled decode step now (otherwise built in the background)"),
    "bench": ("bench", "benchmark against llama.cpp and transformers"),
    "eval": ("eval", "perplexity, KL divergence, benchmark tasks, lm-evaluation-harness"),
    "rag": ("rag", "retrieval: ingest documents, search them, answer with citations, measure (rag --help)"),
    "guard": ("guard", "safety: classify text (Llama Guard-style), evaluate guards, scan code (Code Shield-style)"),
}


def _usage() -> str:
    lines = ["usage: llamaforge COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `llamaforge COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version", "version"):
        from .. import __version__
        print(f"llamaforge {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"llamaforge: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"llamaforge.cli.{COMMANDS[cmd][0]}")
    from ..errors import LlamaforgeError
    try:
        # Modules that serve several commands take the command name as their first argument.
        fn = getattr(module, "main")
        return int(fn(rest, command=cmd) if getattr(fn, "multi_command", False) else fn(rest) or 0)
    except LlamaforgeError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
