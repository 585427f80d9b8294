"""`llamaforge finetune sft|dpo|kto|orpo|rm|rs|grpo|merge`: fine-tune a model, or merge a LoRA adapter.

    llamaforge finetune sft --model smollm2 --data facts.jsonl --out runs/facts --method lora --max-steps 200
    llamaforge finetune rm --model smollm2 --data prefs.jsonl --out runs/rm        (reward model)
    llamaforge finetune rs --model smollm2 --prompts p.jsonl --k 8 --scorer runs/rm --out runs/rs
    llamaforge finetune grpo --model smollm2 --prompts p.jsonl --reward exact --group 8 --out runs/grpo
    torchrun --nproc_per_node=2 -m llamaforge finetune sft ...   (data parallel; rank 0 writes files)
    llamaforge finetune merge --model smollm2 --adapter runs/facts --out merged/ [--to hf|gguf]
"""
from __future__ import annotations

import argparse
import sys

from .flags import add_threads_flag

TASK_HELP = {
    "sft": "supervised fine-tuning",
    "dpo": "direct preference optimization (pairs)",
    "kto": "Kahneman-Tversky optimization (unpaired good/bad completions, or pairs split in two)",
    "orpo": "odds-ratio preference optimization (pairs, no reference model)",
    "rm": "reward model: scalar head, Bradley-Terry loss on pairs (score with `llamaforge reward`)",
    "rs": "rejection sampling: sample K per prompt, keep the best by a scorer, SFT on them, per round",
    "grpo": "group relative policy optimization with a reward model or a verifiable reward",
}
USAGE = ("llamaforge finetune {" + ",".join(TASK_HELP) + ",merge} [options]   "
         "(llamaforge finetune sft --help for options)")
REWARD_HELP = ("a reward model directory (finetune rm), regex:PATTERN (whole completion), json-schema:FILE, "
               "exact (the record's \"answer\"), or a Python file defining reward(prompt, completion) -> float "
               "(your own code, run in this process)")


def _train_parser(task: str) -> argparse.ArgumentParser:
    # Every default is None so that only options given on the command line override a --config file.
    online = task in ("rs", "grpo")
    p = argparse.ArgumentParser(prog=f"llamaforge finetune {task}",
                                description=f"{TASK_HELP[task][0].upper() + TASK_HELP[task][1:]}: "
                                            "settings from --config (YAML/TOML) overridden by options.")
    a = p.add_argument
    a("--config", help="YAML (.yaml/.yml) or TOML (.toml) file with any of the settings below")
    a("--model", help="store name or path (GGUF file, HF directory, Meta directory)")
    if online:
        a("--prompts", "--data", dest="data", help="JSON/JSONL prompts: {\"prompt\": str or messages, "
                                                   "\"answer\": ... (for --reward exact)}")
    else:
        data_help = {"sft": "JSON/JSONL file: Alpaca, chat `messages`, ShareGPT `conversations`",
                     "kto": "JSON/JSONL: {prompt, completion, label: true/false} or prompt/chosen/rejected pairs"}
        a("--data", help=data_help.get(task, "JSON/JSONL preference pairs: prompt/chosen/rejected "
                                             "(optional margin for rm)"))
    a("--out", help="output directory (adapter or model/, checkpoints/, metrics.jsonl, loss.png)")
    a("--method", choices=["full", "lora", "qlora"], help="full weights, LoRA, or LoRA on an NF4 base (default lora)")
    a("--epochs", type=float)
    a("--max-steps", type=int, help="optimizer steps (overrides --epochs)" + (" per round" if task == "rs" else ""))
    a("--lr", type=float, help="peak learning rate (default 2e-4)")
    a("--min-lr-ratio", type=float, help="cosine floor as a fraction of --lr (default 0.1)")
    a("--warmup-steps", type=int)
    a("--weight-decay", type=float)
    a("--max-grad-norm", type=float, help="gradient clipping norm, 0 = off (default 1.0)")
    a("--batch-size", type=int, help="examples (prompts for rs/grpo) per micro-batch per process (default 4)")
    a("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    a("--max-seq-len", type=int, help="longer examples are errors (or skipped with --skip-bad)")
    if task in ("sft", "rs"):
        a("--packing", action="store_const", const=True,
          help="pack examples into max-seq-len rows (per-document attention and positions)")
    a("--lora-r", type=int)
    a("--lora-alpha", type=float)
    a("--lora-dropout", type=float)
    a("--target-modules", help="comma-separated module names (default q_proj,k_proj,v_proj,o_proj)")
    if task == "dpo":
        a("--beta", "--dpo-beta", dest="dpo_beta", type=float, help="DPO beta (default 0.1)")
    if task == "kto":
        a("--beta", "--kto-beta", dest="kto_beta", type=float, help="KTO beta (default 0.1)")
        a("--desirable-weight", dest="kto_desirable_weight", type=float, help="lambda_D (default 1)")
        a("--undesirable-weight", dest="kto_undesirable_weight", type=float, help="lambda_U (default 1)")
    if task == "orpo":
        a("--lambda", "--orpo-lambda", dest="orpo_lambda", type=float, help="odds-ratio weight (default 0.1)")
    if online:
        if task == "rs":
            a("--scorer", "--reward", dest="reward", help=REWARD_HELP)
            a("--k", dest="group_size", type=int, help="samples per prompt (default 8)")
            a("--rounds", dest="rs_rounds", type=int, help="sample/score/keep/train rounds (default 2)")
            a("--threshold", dest="rs_threshold", type=float, help="keep the best sample only if it scores >= this")
        else:
            a("--reward", help=REWARD_HELP)
            a("--group", dest="group_size", type=int, help="completions per prompt, >= 2 (default 8)")
            a("--kl-beta", "--grpo-beta", dest="grpo_beta", type=float,
              help="KL coefficient to the reference (default 0.04)")
            a("--clip-epsilon", dest="grpo_epsilon", type=float, help="policy ratio clip (default 0.2)")
        a("--max-new-tokens", type=int, help="completion length limit (default 64)")
        a("--temperature", type=float, help="sampling temperature (default 1.0)")
    a("--seed", type=int)
    a("--eval-split", type=float, help="held-out fraction (<1) or count (>=1) of examples"
                                       + (" (grpo: held-out greedy reward)" if task == "grpo" else ""))
    a("--eval-every", type=int)
    a("--save-every", type=int, help="write a checkpoint every N steps")
    a("--keep-checkpoints", type=int)
    a("--resume", action="store_const", const=True, help="continue from the last complete checkpoint in --out")
    a("--skip-bad", action="store_const", const=True, help="skip and count bad records instead of failing")
    a("--gradient-checkpointing", action="store_const", const=True)
    a("--precision", choices=["auto", "fp32", "bf16"])
    a("--device", help="auto (default), cpu, cuda, cuda:N")
    add_threads_flag(p, "CPU threads per process (default: $LLAMAFORGE_NUM_THREADS or $OMP_NUM_THREADS, else "
                        "the usable cores divided among torchrun's local processes)")
    a("--log-every", type=int)
    return p


def _merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamaforge finetune merge",
                                description="Fold a LoRA adapter into its base model and save a full model.")
    p.add_argument("--model", required=True, help="base model: store name or path")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory")
    p.add_argument("--out", required=True, help="output: HF directory, or a .gguf file")
    p.add_argument("--to", choices=["hf", "gguf"], help="output format (default: gguf if --out ends in .gguf)")
    p.add_argument("--gguf-type", "--type", dest="gguf_type", choices=["f16", "f32", "q8_0", "q4_0", "q4_1"],
                   default="f16", help="GGUF weight type (default f16); q4_0/q4_1/q8_0 run in llama.cpp and "
                                       "Ollama as they are")
    add_threads_flag(p)
    return p


def _train(task: str, argv: list[str]) -> int:
    from ..train.config import TrainConfig
    args = _train_parser(task).parse_args(argv)
    _apply_train_threads(args.threads)
    settings = TrainConfig.from_file(args.config) if args.config else {}
    settings = {str(k).replace("-", "_"): v for k, v in settings.items()}
    settings.update({k: v for k, v in vars(args).items() if v is not None and k not in ("config", "threads")})
    settings["task"] = task
    cfg = TrainConfig.from_dict(settings, source=args.config or "options").validate()
    from ..train.jobs import train
    result = train(cfg)
    import os
    if os.environ.get("RANK", "0") == "0":
        rep = result.data_report
        if rep is not None and rep.read:
            print(f"data: {rep.summary()}", file=sys.stderr)
        for r in result.rounds:
            kept = "n/a" if r["kept_reward_mean"] is None else f"{r['kept_reward_mean']:.4f}"
            print(f"round {r['round']}: kept {r['kept']}/{r['prompts']} prompts, kept reward mean {kept}, "
                  f"{r['steps']} steps")
        last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
        print(f"trained {result.steps} steps, last loss {last}"
              + "".join(f", {k} {v:.4f}" for k, v in result.eval.items()))
        if result.skipped:
            print(result.skipped_summary(), file=sys.stderr)
        print(f"saved: {result.saved}")
    return 0


def _apply_train_threads(threads: int | None) -> None:
    # torchrun starts LOCAL_WORLD_SIZE processes on this machine: each gets its share of the cores.
    import os

    from ..threads import apply_threads, default_threads, usable_cores
    if threads is None and not (os.environ.get("LLAMAFORGE_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")):
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        threads = max(1, usable_cores() // local) if local > 1 else default_threads()
    apply_threads(threads)


def _merge(argv: list[str]) -> int:
    from pathlib import Path
    args = _merge_parser().parse_args(argv)
    _apply_train_threads(args.threads)
    from ..formats import convert
    from ..train.lora import LoRALinear, apply_adapter, merge_lora, read_adapter_config
    from ..train.base_model import load_base_model
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
        print(USAGE + "\n\n" + "".join(f"  {k:<6} {v}\n" for k, v in TASK_HELP.items())
              + "  merge  fold a LoRA adapter into a full model")
        return 0 if argv else 2
    sub, rest = argv[0], argv[1:]
    if sub in TASK_HELP:
        return _train(sub, rest)
    if sub == "merge":
        return _merge(rest)
    print(f"llamaforge finetune: unknown subcommand {sub!r}\nusage: {USAGE}", file=sys.stderr)
    return 2
