"""`llamaforge eval`: perplexity and KL divergence, benchmark tasks, reports, lm-evaluation-harness.

    llamaforge eval perplexity MODEL --file TEXT [--ctx C] [--stride S] [--json] [--kl-base MODEL2]
    llamaforge eval run MODEL --task T [--task T2] [--limit N] [--robustness all|case,typos,...]
                                [--compare MODEL2|RESULTS.json]... [--quants none,q4] [--out DIR] [--json]
    llamaforge eval compare RESULTS.json RESULTS2.json... [--out DIR]
    llamaforge eval tasks                      # the shipped tasks
    llamaforge eval export TASK --out DIR      # a task as an lm-evaluation-harness task (YAML + JSONL)
    llamaforge eval lm-eval ARGS...            # lm-eval's own command line with `--model llamaforge` available

`--server URL` evaluates a running OpenAI-compatible server (e.g. `llamaforge serve`) instead of loading MODEL:
MODEL is then the served model's name. Ctrl-C stops a run and prints what was done so far (exit status 130).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import InvalidRequestError, LlamaforgeError
from .flags import add_threads_flag, apply_threads_flag

SUBCOMMANDS = ("perplexity", "run", "compare", "tasks", "export", "lm-eval")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", help="weights/activations dtype (float32 gives the dequantized reference)")
    p.add_argument("--quant", help="in-memory weight format: auto, none, q4, int8, bf16")
    p.add_argument("--batch-size", type=int, help="sequences per forward / requests decoded together")
    p.add_argument("--server", metavar="URL", help="evaluate this running server instead of loading MODEL")
    p.add_argument("--api-key", help="API key for --server")
    add_threads_flag(p)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llamaforge eval", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="sub", required=True)
    p = sub.add_parser("perplexity", help="perplexity of a text (± standard error), optional KL divergence")
    p.add_argument("model")
    p.add_argument("--file", required=True, help="UTF-8 text file")
    p.add_argument("--ctx", type=int, help="window size in tokens (default 512, at most the model's context)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: --ctx, no overlap)")
    p.add_argument("--kl-base", metavar="MODEL2", help="also compare MODEL's token distributions with MODEL2's")
    p.add_argument("--base-dtype", default="float32", help="dtype of --kl-base (default float32)")
    p.add_argument("--generation-kernels", action="store_true",
                   help="score 4-bit weights through the packed kernels generation uses (slower) instead of "
                        "float32 GEMMs over the same weights dequantized on the fly")
    p.add_argument("--json", action="store_true", help="print JSON")
    _common(p)
    r = sub.add_parser("run", help="run benchmark tasks and write Markdown/JSON/PNG reports")
    r.add_argument("model")
    r.add_argument("--task", action="append", required=True, help="a shipped task name or a task YAML file")
    r.add_argument("--limit", type=int, help="at most N examples per task")
    r.add_argument("--robustness", help="perturbations to re-run with: all, or a list of case,typos,whitespace,"
                                        "distractor")
    r.add_argument("--seed", type=int, default=0, help="seed of the perturbations")
    r.add_argument("--compare", action="append", default=[], metavar="MODEL_OR_JSON",
                   help="another model (or a results JSON of an earlier run) to put side by side")
    r.add_argument("--quants", help="run MODEL once per in-memory format (e.g. none,q4,int8), side by side")
    r.add_argument("--out", help="report directory (default runs/eval/TIMESTAMP)")
    r.add_argument("--json", action="store_true", help="print the results as JSON")
    _common(r)
    c = sub.add_parser("compare", help="put saved results side by side")
    c.add_argument("results", nargs="+")
    c.add_argument("--out", help="report directory (default runs/eval/TIMESTAMP)")
    sub.add_parser("tasks", help="list the shipped tasks")
    e = sub.add_parser("export", help="write a task as an lm-evaluation-harness task")
    e.add_argument("task")
    e.add_argument("--out", required=True)
    return ap


def main(argv: list[str]) -> int:
    if argv and argv[0] == "lm-eval":
        return _lm_eval(argv[1:])
    args = _parser().parse_args(argv)
    if getattr(args, "model", None) is not None and not getattr(args, "server", None):
        apply_threads_flag(args)
    return {"perplexity": _perplexity, "run": _run, "compare": _compare, "tasks": _tasks,
            "export": _export}[args.sub](args)


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)


def _load(spec: str, args, quant=None):
    import llamaforge
    return llamaforge.load(spec, dtype=args.dtype, quant=quant if quant is not None else args.quant,
                           threads=args.threads)


def _out_dir(args) -> Path:
    return Path(args.out) if args.out else Path("runs") / "eval" / time.strftime("%Y%m%d-%H%M%S")


# ------------------------------------------------------------------------------------------------ perplexity
def _perplexity(args) -> int:
    from .._fs import read_text_bounded
    from ..eval import perplexity as P
    text = read_text_bounded(args.file, 256 << 20, f"text file {args.file}")
    if not text.strip():
        raise InvalidRequestError(f"the text file {args.file} is empty", field="file")
    if args.server:
        if args.kl_base:
            raise InvalidRequestError("--kl-base needs both models in process (the server returns no full "
                                      "distributions)", field="kl_base")
        if args.generation_kernels:
            raise InvalidRequestError("--generation-kernels applies to a model in process; the server scores "
                                      "prompts its own way", field="generation_kernels")
        res = _server_perplexity(args, text)
    else:
        lm = _load(args.model, args)
        ids = P.text_ids(lm, text)
        ctx = P.check_ctx(lm, args.ctx)
        wins = P.windows(len(ids), ctx, args.stride or ctx)
        if args.kl_base:
            base = _load(args.kl_base, argparse.Namespace(dtype=args.base_dtype, quant=None))
            bar = _progress(len(wins), "windows")
            cmp = P.compare(lm, base, ids, ctx=ctx, stride=args.stride, batch_size=args.batch_size,
                            progress=bar.update, dense=not args.generation_kernels)
            bar.close()
            _print_comparison(cmp, args)
            return 130 if cmp.interrupted else 0
        bar = _progress(len(wins), "windows")
        res = P.perplexity(lm, ids, ctx=ctx, stride=args.stride, batch_size=args.batch_size, progress=bar.update,
                           dense=not args.generation_kernels)
        bar.close()
    if args.json:
        print(json.dumps({"ppl": res.ppl, "ppl_stderr": res.ppl_stderr, "tokens": res.tokens,
                          **({"interrupted": True} if res.interrupted else {})}))
    else:
        print(f"perplexity {res.ppl:.4f} ± {res.ppl_stderr:.4f} over {res.tokens} tokens "
              f"(windows of {res.ctx}, stride {res.stride}, {res.windows_done}/{res.windows} windows, "
              f"{res.tokens_per_second:.0f} tokens/s)")
        if res.interrupted:
            print("interrupted: the figures cover the windows finished so far")
    return 130 if res.interrupted else 0


def _server_perplexity(args, text: str):
    import time as _t

    import numpy as np

    from ..eval import perplexity as P
    from ..eval.remote import ServerBackend
    b = ServerBackend(args.server, args.model, api_key=args.api_key)
    ids = b.tokenize(text, True)
    if ids is None:
        raise LlamaforgeError(f"{args.server} has no /tokenize endpoint; perplexity needs the server's tokens")
    ctx = args.ctx or min(P.DEFAULT_CTX, int(b.tokenizer_info().get("model_max_length") or P.DEFAULT_CTX))
    stride = args.stride or ctx
    wins = P.windows(len(ids), ctx, stride)
    nlls, done, seen, t0 = [], 0, 0, _t.perf_counter()
    interrupted = False
    try:
        for w in wins:
            lps = b.token_logprobs(ids[w.begin:w.end])
            nlls.append(-np.asarray(lps[w.first - w.begin:], dtype=np.float64))
            done += 1
            seen += w.end - w.begin
    except KeyboardInterrupt:
        interrupted = True
    return P.result_from(nlls, ctx, stride, wins, done, t0, interrupted, seen)


def _print_comparison(c, args) -> None:
    if args.json:
        print(json.dumps(c.to_json()))
        return
    k, d = c.kld, c.delta_p
    print(f"tokens scored           {c.tokens}")
    print(f"Mean PPL(Q)             {c.ppl:.4f}")
    print(f"Mean PPL(base)          {c.ppl_base:.4f}")
    print(f"Cor(ln PPL(Q), ln PPL(base))  {100 * c.correlation:.2f}%")
    print(f"Mean ln(PPL(Q)/PPL(base)) {c.ln_ratio[0]:.6f} ± {c.ln_ratio[1]:.6f}")
    print(f"Mean PPL(Q)/PPL(base)   {c.ratio[0]:.6f} ± {c.ratio[1]:.6f}")
    print(f"Mean PPL(Q)-PPL(base)   {c.difference[0]:.6f} ± {c.difference[1]:.6f}")
    print(f"Mean    KLD             {k['mean']:.6f} ± {k['stderr']:.6f}")
    print(f"Maximum KLD             {k['max']:.6f}")
    for p in ("p99.9", "p99", "p95", "p90", "p50", "p10", "p5", "p1"):
        print(f"{(p[1:] + '%') if p != 'p50' else 'Median':<8}KLD             {k[p]:.6f}")
    print(f"Minimum KLD             {k['min']:.6f}")
    print(f"Mean    Δp              {100 * d['mean']:.3f} ± {100 * d['stderr']:.3f} %")
    print(f"Maximum Δp              {100 * d['max']:.3f}%")
    for p in ("p99.9", "p99", "p95", "p90", "p75", "p50", "p25", "p10", "p5", "p1", "p0.1"):
        print(f"{(p[1:] + '%') if p != 'p50' else 'Median':<8}Δp              {100 * d[p]:.3f}%")
    print(f"Minimum Δp              {100 * d['min']:.3f}%")
    print(f"RMS Δp                  {100 * d['rms']:.3f} %")
    print(f"Same top p              {100 * c.same_top[0]:.3f} ± {100 * c.same_top[1]:.3f} %")
    if c.interrupted:
        print("interrupted: the figures cover the windows finished so far")


# ------------------------------------------------------------------------------------------------ tasks
def _robustness(spec: str | None) -> list[str]:
    from ..eval.perturb import PERTURBATIONS
    if not spec:
        return []
    kinds = list(PERTURBATIONS) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    bad = [k for k in kinds if k not in PERTURBATIONS]
    if bad:
        raise InvalidRequestError(f"unknown perturbation(s) {', '.join(bad)}; choose all or from "
                                  f"{', '.join(PERTURBATIONS)}", field="robustness")
    return kinds


def _run_model(backend, tasks, args, robustness) -> tuple[list, bool]:
    from ..eval.runner import run_task
    results = []
    for t in tasks:
        n = min(len(t.items), args.limit or len(t.items)) * (1 + len(robustness))
        bar = _progress(n, f"{t.name}")
        r = run_task(backend, t, limit=args.limit, robustness=robustness, seed=args.seed, progress=bar.update)
        bar.close()
        results.append(r)
        if r.interrupted:
            return results, True
    return results, False


def _backend(spec: str, args, quant=None):
    from ..eval.backends import InProcessBackend
    if args.server:
        from ..eval.remote import ServerBackend
        return ServerBackend(args.server, spec, api_key=args.api_key, batch_size=args.batch_size)
    lm = _load(spec, args, quant)
    label = spec if quant is None else f"{spec} ({lm.metadata.get('quant') or quant})"
    return InProcessBackend(lm, batch_size=args.batch_size, label=label)


def _run(args) -> int:
    from ..eval import report
    from ..eval.tasks import load_task
    if args.limit is not None and args.limit < 1:
        raise InvalidRequestError("--limit must be at least 1", field="limit")
    tasks = [load_task(t) for t in args.task]   # every task file is checked before any model loads
    robustness = _robustness(args.robustness)
    runs, interrupted = [], False
    specs = [(args.model, q) for q in args.quants.split(",")] if args.quants else [(args.model, None)]
    specs += [(c, None) for c in args.compare if not c.endswith(".json")]
    for spec, quant in specs:
        results, interrupted = _run_model(_backend(spec, args, quant), tasks, args, robustness)
        runs.append(results)
        if interrupted:
            break
    for c in args.compare:
        if c.endswith(".json"):
            runs += report.load_runs(Path(c))
    return _finish(runs, args, interrupted)


def _finish(runs, args, interrupted: bool) -> int:
    from ..eval import report
    paths = report.write_reports(runs, _out_dir(args))
    if getattr(args, "json", False):
        print(json.dumps({"runs": [[r.to_json() for r in run] for run in runs]}, default=str))
    else:
        print(report.markdown(runs[0]) if len(runs) == 1 else report.compare_markdown(runs), end="")
        print(f"\nreports: {paths['md']}, {paths['json']}, {paths['png']}")
    if interrupted:
        print("interrupted: the results cover the examples finished so far", file=sys.stderr)
        return 130
    return 0


def _compare(args) -> int:
    from ..eval import report
    runs = []
    for p in args.results:
        runs += report.load_runs(Path(p))
    return _finish(runs, args, False)


def _tasks(args) -> int:
    from ..eval.tasks import load_task, shipped_tasks
    for name in shipped_tasks():
        t = load_task(name)
        print(f"{name:<14} {t.kind:<16} {len(t.items):>4} examples  {t.description}")
    return 0


def _export(args) -> int:
    from ..eval.lm_eval_tasks import export_task
    from ..eval.tasks import load_task
    path = export_task(load_task(args.task), Path(args.out))
    print(f"wrote {path} (run: lm_eval --include_path {path.parent} --tasks {path.stem} ...)")
    return 0


def _lm_eval(argv: list[str]) -> int:
    """lm-eval's own command line, after registering the llamaforge backend in its registry."""
    try:
        import lm_eval.__main__ as lm_main
    except ImportError:
        raise LlamaforgeError("lm-evaluation-harness is not installed: pip install 'llamaforge[eval]'") from None
    from ..eval import harness  # noqa: F401  (registers --model llamaforge)
    old = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        lm_main.cli_evaluate()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        sys.argv = old
    return 0
