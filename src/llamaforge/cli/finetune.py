"""`llamaforge finetune sft|dpo|merge`: fine-tune a model on a JSON/JSONL file, or merge a LoRA adapter.

    llamaforge finetune sft --model smollm2 --data facts.jsonl --out runs/facts --method lora --max-steps 200
    torchrun --nproc_per_node=2 -m llamaforge finetune sft ...   (data parallel; rank 0 writes files)
    llamaforge finetune merge --model smollm2 --adapter runs/facts --out merged/ [--to hf|gguf]
"""
from __future__ import annotations

import argparse
import sys

USAGE = "llamaforge finetune {sft,dpo,merge} [options]   (llamaforge finetune sft --help for options)"


def _train_parser(task: str) -> argparse.ArgumentParser:
    # Every default is None so that only options given on the command line override a --config file.
    p = argparse.ArgumentParser(prog=f"llamaforge finetune {task}",
                                description=f"{'Supervised fine-tuning' if task == 'sft' else 'DPO'}: "
                                            "settings from --config (YAML/TOML) overridden by options.")
    a = p.add_argument
    a("--config", help="YAML (.yaml/.yml) or TOML (.toml) file with any of the settings below")
    a("--model", help="store name or path (GGUF file, HF directory, Meta directory)")
    a("--data", help="JSON/JSONL file: Alpaca, chat `messages`, ShareGPT `conversations`"
                     + (", or preference pairs (prompt/chosen/rejected)" if task == "dpo" else ""))
    a("--out", help="output directory (adapter or model/, checkpoints/, metrics.jsonl, loss.png)")
    a("--method", choices=["full", "lora", "qlora"], help="full weights, LoRA, or LoRA on an NF4 base (default lora)")
    a("--epochs", type=float)
    a("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    a("--lr", type=float, help="peak learning rate (default 2e-4)")
    a("--min-lr-ratio", type=float, help="cosine floor as a fraction of --lr (default 0.1)")
    a("--warmup-steps", type=int)
    a("--weight-decay", type=float)
    a("--max-grad-norm", type=float, help="gradient clipping norm, 0 = off (default 1.0)")
    a("--batch-size", type=int, help="examples per micro-batch per process (default 4)")
    a("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    a("--max-seq-len", type=int, help="longer examples are errors (or skipped with --skip-bad)")
    a("--packing", action="store_const", const=True, help="pack SFT examples into max-seq-len rows")
    a("--lora-r", type=int)
    a("--lora-alpha", type=float)
    a("--lora-dropout", type=float)
    a("--target-modules", help="comma-separated module names (default q_proj,k_proj,v_proj,o_proj)")
    if task == "dpo":
        a("--beta", "--dpo-beta", dest="dpo_beta", type=float, help="DPO beta (default 0.1)")
    a("--seed", type=int)
    a("--eval-split", type=float, help="held-out fraction (<1) or count (>=1) of examples")
    a("--eval-every", type=int)
    a("--save-every", type=int, help="write a checkpoint every N steps")
    a("--keep-checkpoints", type=int)
    a("--resume", action="store_const", const=True, help="continue from the last complete checkpoint in --out")
    a("--skip-bad", action="store_const", const=True, help="skip and count bad records instead of failing")
    a("--gradient-checkpointing", action="store_const", const=True)
    a("--precision", choices=["auto", "fp32", "bf16"])
    a("--device", help="auto (default), cpu, cuda, cuda:N")
    a("--log-every", type=int)
    return p


def _merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamaforge finetune merge",
                                description="Fold a LoRA adapter into its base model and save a full model.")
    p.add_argument("--model", required=True, help="base model: store name or path")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory")
    p.add_argument("--out", required=True, help="output: HF directory, or a .gguf file")
    p.add_argument("--to", choices=["hf", "gguf"], help="output format (default: gguf if --out ends in .gguf)")
    p.add_argument("--gguf-type", choices=["f16", "f32", "q8_0"], default="f16")
    return p


def _train(task: str, argv: list[str]) -> int:
    from ..train.config import TrainConfig
    args = _train_parser(task).parse_args(argv)
    settings = TrainConfig.from_file(args.config) if args.config else {}
    settings = {str(k).replace("-", "_"): v for k, v in settings.items()}
    settings.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    settings["task"] = task
    cfg = TrainConfig.from_dict(settings, source=args.config or "options").validate()
    from ..train.trainer import train
    result = train(cfg)
    import os
    if os.environ.get("RANK", "0") == "0":
        rep = result.data_report
        if rep is not None and rep.read:
            print(f"data: {rep.summary()}", file=sys.stderr)
        last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
        print(f"trained {result.steps} steps, last loss {last}"
              + "".join(f", {k} {v:.4f}" for k, v in result.eval.items()))
        print(f"saved: {result.saved}")
    return 0


def _merge(argv: list[str]) -> int:
    from pathlib import Path
    args = _merge_parser().parse_args(argv)
    from ..formats import convert
    from ..train.lora import LoRALinear, apply_adapter, merge_lora, read_adapter_config
    from ..train.trainer import load_base_model
    to = args.to or ("gguf" if args.out.endswith(".gguf") else "hf")
    type_ = args.gguf_type if to == "gguf" else "f32"   # an HF output keeps the float32 the merge computed in
    convert.check_output(args.out, to, type_, force=True)  # fail before the slow model load
    read_adapter_config(args.adapter)
    lm = load_base_model(args.model)
    apply_adapter(lm, args.adapter, merge=True)
    if any(isinstance(m, LoRALinear) for m in lm.model.modules()):
        merge_lora(lm.model)  # quantized bases: dequantize and fold
    sd = {k: v.detach() for k, v in lm.model.state_dict().items()}
    # The base's tokenizer, chat template and license travel over, as in `llamaforge convert`.
    source = convert.source_info(lm.path) if lm.path is not None else None
    convert.write_model(Path(args.out), to, lm.config, sd, source, type_, force=True)
    print(f"merged {args.adapter} into {args.model}: {args.out} ({to})")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n  sft    supervised fine-tuning\n  dpo    direct preference optimization\n"
                      "  merge  fold a LoRA adapter into a full model")
        return 0 if argv else 2
    sub, rest = argv[0], argv[1:]
    if sub in ("sft", "dpo"):
        return _train(sub, rest)
    if sub == "merge":
        return _merge(rest)
    print(f"llamaforge finetune: unknown subcommand {sub!r}\nusage: {USAGE}", file=sys.stderr)
    return 2
