"""`llamaforge reward MODEL --data FILE`: a reward model's pairwise accuracy on preference pairs.

    llamaforge finetune rm --model smollm2 --data prefs.jsonl --out runs/rm
    llamaforge reward runs/rm --data heldout_prefs.jsonl          # accuracy: chosen scored above rejected
    llamaforge reward runs/rm --prompt "2+2?" --completion "4"     # one score
"""
from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamaforge reward",
                                description="Score preference pairs (or one completion) with a reward model "
                                            "trained by `llamaforge finetune rm`.")
    p.add_argument("model", help="reward model directory (the --out of `finetune rm`)")
    p.add_argument("--data", help="JSON/JSONL preference pairs (prompt/chosen/rejected)")
    p.add_argument("--prompt", help="score one completion of this prompt (with --completion)")
    p.add_argument("--completion", help="the completion to score")
    p.add_argument("--base", help="base model, when it is not where reward_model.json says")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=4096, help="longer pairs are errors (or skipped)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of failing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if (args.data is None) == (args.prompt is None):
        print("llamaforge reward: give --data FILE, or --prompt and --completion", file=sys.stderr)
        return 2
    if args.prompt is not None and args.completion is None:
        print("llamaforge reward: --prompt needs --completion", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("llamaforge reward: --batch-size must be >= 1", file=sys.stderr)
        return 2
    from pathlib import Path
    from ..train.data import DataReport, DatasetError, load_dataset
    from ..train.reward_model import load_reward_model, read_reward_meta
    read_reward_meta(args.model)  # a clear error before the slow model load
    if args.data is not None and not Path(args.data).is_file():
        raise DatasetError(args.data, None, "no such file")
    rm = load_reward_model(args.model, base=args.base)
    rm.batch_size = args.batch_size
    if args.prompt is not None:
        score = rm.score(args.prompt, args.completion)
        print(json.dumps({"reward": score}) if args.json else f"{score:.6f}")
        return 0
    report = DataReport()
    pairs = load_dataset(args.data, rm.chat_format, kind="preference", max_seq_len=args.max_seq_len,
                         skip_bad=args.skip_bad, report=report)
    res = rm.pairwise_accuracy(pairs)
    if args.json:
        print(json.dumps({**res, "data": args.data, "skipped": dict(report.skipped)}))
    else:
        if report.skipped:
            print(f"data: {report.summary()}", file=sys.stderr)
        print(f"pairwise accuracy {res['accuracy']:.4f} ({round(res['accuracy'] * res['pairs'])}/{res['pairs']} "
              f"pairs, {res['ties']} ties), mean margin {res['mean_margin']:.4f}")
    return 0
