"""The ``opcd`` command line: a thin layer over the Python API.

    opcd train CONFIG.yaml [key=value ...] [--resume | --overwrite]
    opcd eval --model PATH_OR_NAME --task TASK [--with-context] [--split eval] [--size N]
    opcd eval MODEL_OR_RUN --harness TASK[,TASK] [--harness-include DIR] [--limit N]
    opcd demo [--run-dir DIR] [--steps N]
    opcd models                  list the embedded models and what is in the cache
    opcd models pull NAME        fetch, verify and prepare one
    opcd bench [--model M --batch B --context C --prompt P --response R ...]
    opcd extract CONFIG.yaml [key=value ...] [--overwrite]
    opcd compare SPEC.yaml | --runs A B ... [--task T ...]
    opcd chat MODEL_OR_RUN [--context TEXT | --context-file PATH] [--side-by-side | --compare-base]
    opcd push RUN_DIR [REPO_ID] [--public | --private]

Each command calls one function (``opcd.train``, ``opcd.evaluate_model``, ``opcd.tools.demo``,
``opcd.models.list_models`` / ``pull``; ``opcd eval --harness``: lm-evaluation-harness
through ``opcd.eval.harness.evaluate_harness``, an optional extra). User errors (:class:`opcd.errors.OpcdError`) are
printed as one paragraph and exit with status 2. ``opcd train`` stopped by SIGINT / SIGTERM
saves a checkpoint and exits with 130 / 143 (128 + the signal), saying to continue with
``--resume``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from opcd.errors import CollapseError, OpcdError, TrainingInterrupted


def _cmd_train(args: argparse.Namespace) -> int:
    from opcd.training.loop import train

    result = train(args.config, args.overrides, resume=args.resume, overwrite=args.overwrite,
                   progress=not args.quiet)
    last = result.evals[-1] if result.evals else None
    print(f"run folder: {result.run_dir}")
    print(f"final model: {result.final_model}")
    if last:
        print(f"final eval (without context): {last['score']:.3f} ± {last['stderr']:.3f}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.harness is not None:
        return _cmd_eval_harness(args)
    if (args.limit is not None or args.harness_include or args.num_fewshot is not None
            or args.batch_size is not None or args.chat_template):
        raise OpcdError("--limit, --num-fewshot, --batch-size, --chat-template and "
                        "--harness-include go with --harness TASKS (lm-eval tasks); opcd's own "
                        "tasks take --size N.")
    if args.model is None or args.task is None:
        raise OpcdError("`opcd eval` needs --model PATH_OR_NAME and --task TASK (opcd's own "
                        "tasks), or MODEL_OR_RUN --harness TASKS (lm-eval tasks).")
    from opcd.api import evaluate_model

    res = evaluate_model(
        args.model, args.task, split=args.split, with_context=args.with_context, size=args.size,
        max_new_tokens=48 if args.max_new_tokens is None else args.max_new_tokens,
        temperature=args.temperature, seed=args.seed,
        config=args.config, overrides=args.overrides, records_path=args.output_jsonl,
        judge=args.judge,
    )
    if args.output_jsonl:
        print(f"records in {args.output_jsonl} ({res.resumed} of {res.n} read back from an "
              "earlier run)")
    print(res.summary())
    if res.details:
        print(f"  {res.details_line()}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(res.to_dict(), f, indent=1, ensure_ascii=False)
        print(f"responses written to {args.output}")
    return 0


def _cmd_eval_harness(args: argparse.Namespace) -> int:
    """``opcd eval MODEL_OR_RUN --harness TASKS``: lm-eval on the model; a table, and with
    --output the metrics, settings and every item's record as JSON."""
    from opcd.eval.harness import evaluate_harness

    refs = ([args.model] if args.model else []) + list(args.overrides)
    if len(refs) != 1:
        raise OpcdError("`opcd eval --harness TASKS` takes one MODEL_OR_RUN (a run folder, a "
                        f"packaged name or a model folder), got {refs or 'none'}.")
    unused = [flag for flag, used in (
        ("--task", args.task is not None), ("--with-context", args.with_context),
        ("--judge", args.judge is not None), ("--split", args.split != "eval"),
        ("--size", args.size is not None), ("--config", args.config is not None),
        ("--output-jsonl", args.output_jsonl is not None),
        ("--temperature", args.temperature != 1.0)) if used]
    if unused:
        raise OpcdError(f"{', '.join(unused)} do not apply to --harness (lm-eval's tasks set "
                        "their own prompts and decoding); use --limit N to score fewer items.")
    res = evaluate_harness(
        refs[0], args.harness, include=args.harness_include or None, limit=args.limit,
        num_fewshot=args.num_fewshot, seed=args.seed, max_gen_toks=args.max_new_tokens,
        batch_size=8 if args.batch_size is None else args.batch_size,
        apply_chat_template=args.chat_template,
    )
    limit = f", limit {args.limit}" if args.limit is not None else ""
    print(f"lm-eval {res.lm_eval_version} on {res.location} ({res.settings['device']}, "
          f"{res.settings['dtype']}{limit}, seed {args.seed}):")
    print(res.table())
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(res.to_dict(), f, indent=1, ensure_ascii=False, default=str)
        print(f"metrics and every item written to {args.output}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from opcd.tools.demo import demo

    demo(run_dir=args.run_dir, steps=args.steps, model=args.model, progress=not args.quiet,
         overrides=args.overrides)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from opcd import models

    if args.action == "pull":
        if not args.name:
            raise OpcdError("`opcd models pull` needs a model name; run `opcd models` to list them.")
        path = models.pull(args.name, force=args.force)
        print(f"{args.name} is ready at {path}")
        return 0
    print(models.format_model_table(models.list_models()))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import shlex

    from opcd.tools.bench import BenchSpec, run

    spec = BenchSpec(
        model=args.model, batch=args.batch, context=args.context, prompt=args.prompt,
        response=args.response, micro_batch=args.micro_batch, lora=args.lora, steps=args.steps,
        top_k=args.top_k, seed=args.seed, phases=args.phases.split(","),
        modes=args.modes.split(","), overrides=list(args.overrides), ovd_group=args.ovd_group,
    )
    flags = [f"--model {shlex.quote(spec.model)}", f"--batch {spec.batch}", f"--context {spec.context}",
             f"--prompt {spec.prompt}", f"--response {spec.response}",
             f"--micro-batch {spec.micro_batch}", f"--steps {spec.steps}", f"--top-k {spec.top_k}",
             f"--phases {args.phases}", f"--modes {args.modes}"]
    flags += [f"--ovd-group {spec.ovd_group}"] * ("ovd" in spec.modes)
    flags += ["--lora"] * spec.lora + ["--in-process"] * args.in_process
    command = " ".join(["opcd bench", *flags, *(shlex.quote(o) for o in spec.overrides)])
    run(spec, output=args.output or None, command=command, in_process=args.in_process)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from opcd.tools.experience import extract_experience

    res = extract_experience(args.config, args.overrides, overwrite=args.overwrite,
                             progress=not args.quiet)
    print(f"trace: {res.trace_path} ({res.updates_done} updates, {res.resumed} read back)")
    print(f"experience: {res.experience_path} ({len(res.items)} items; validation "
          f"{res.score} vs {res.baseline} without experience; run {res.run}, update {res.update})")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from opcd.eval.compare import compare, spec_from_runs

    if (args.spec is None) == (not args.runs):
        raise OpcdError("`opcd compare` takes a SPEC.yaml or --runs A B ..., not both or neither.")
    spec = args.spec
    if spec is None:
        ev = {k: v for k, v in (("size", args.size), ("max_new_tokens", args.max_new_tokens),
                                ("temperature", args.temperature), ("seed", args.seed))
              if v is not None}
        spec = spec_from_runs(args.runs, args.task, split=args.split, base=args.base,
                              output=args.output, eval_settings=ev)
    res = compare(spec, output=args.output, progress=not args.quiet)
    print(res.markdown.read_text(encoding="utf-8"))
    print(f"table: {res.markdown}, {res.csv}; plot: {res.plot or 'none (no run folders)'}; "
          f"{res.evaluated} cells evaluated, the rest from the cache")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from opcd.tools.interactive import (
        ChatOptions,
        chat_session,
        format_event,
        open_chat,
        stdin_lines,
    )

    options = ChatOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed)
    setup = open_chat(args.model, context=args.context, context_file=args.context_file,
                      side_by_side=args.side_by_side, compare_base=args.compare_base)
    print(setup.header, file=sys.stderr)
    tty = sys.stdin.isatty()
    for event in chat_session(setup.lanes, stdin_lines("you> " if tty else ""), options):
        if not (tty and event.kind == "user"):  # a terminal already shows what was typed
            print(format_event(event), flush=True)
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from opcd.tools.hub import push

    url = push(args.run_dir, args.repo_id, private=args.private)
    print(f"pushed {args.run_dir}/final (with its model card) to {url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opcd",
        description="On-Policy Context Distillation: distil a context (system prompt, "
        "experience, hints) into a model's weights.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run OPCD from a YAML config with key=value overrides")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in run.dir")
    g.add_argument("--overwrite", action="store_true", help="delete run.dir and start again")
    t.add_argument("--quiet", action="store_true", help="no progress bar or step lines")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="score a model on a task, with or without the context; "
                       "--harness: on lm-eval tasks (optional extra)")
    e.add_argument("--model", default=None, help="registry name, local HF folder, GGUF file or hub id")
    e.add_argument("--task", default=None, help="task name (e.g. french)")
    e.add_argument("--with-context", action="store_true", help="put the task's context in the prompt")
    e.add_argument("--judge", default=None, metavar="MODEL",
                   help="rate the answers' quality with this model given the context (e.g. the "
                        "base model a run started from)")
    e.add_argument("--split", default="eval", help="train or eval (default: eval)")
    e.add_argument("--size", type=int, default=None, help="score only the first N examples")
    e.add_argument("--max-new-tokens", type=int, default=None,
                   help="default 48; with --harness: caps generation (default: each task's own)")
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--seed", type=int, default=1234)
    e.add_argument("--config", default=None, help="a run config whose task section to use")
    e.add_argument("--output", default=None, help="write every response and score as JSON")
    e.add_argument("--output-jsonl", default=None, metavar="PATH",
                   help="append each finished batch's records to PATH (JSONL); running the same "
                   "command again skips the items already there (resumable)")
    h = e.add_argument_group(
        "lm-evaluation-harness", "opcd eval MODEL_OR_RUN --harness TASK[,TASK] (needs "
        'pip install "opcd[harness]"): MODEL_OR_RUN is a run folder (its final/ model), a '
        "packaged name or a model folder")
    h.add_argument("--harness", default=None, metavar="TASK[,TASK]",
                   help="lm-eval task names or task YAML files (opcd_tiny_qa is packaged)")
    h.add_argument("--harness-include", action="append", default=None, metavar="DIR",
                   help="a folder of lm-eval task YAML files (repeatable)")
    h.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score only the first N items of each task")
    h.add_argument("--num-fewshot", type=int, default=None, help="default: each task's own")
    h.add_argument("--batch-size", type=int, default=None, help="default 8")
    h.add_argument("--chat-template", action="store_true",
                   help="format prompts with the model's chat template (instruct models)")
    e.add_argument("overrides", nargs="*",
                   help="task overrides, e.g. task.context='...' (with --harness: MODEL_OR_RUN)")
    e.set_defaults(func=_cmd_eval)

    d = sub.add_parser("demo", help="distil 'Always answer in French' into the packaged Qwen 0.5B")
    d.add_argument("--run-dir", default=None, help="where to write the run (default runs/demo)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default from the demo config)")
    d.add_argument("--model", default=None, help="another student model (default qwen2.5-coder-0.5b-instruct)")
    d.add_argument("--quiet", action="store_true")
    d.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="changes to the demo config, e.g. train.steps=16 rollout.max_new_tokens=64")
    d.set_defaults(func=_cmd_demo)

    m = sub.add_parser("models", help="list embedded models; `models pull NAME` fetches one")
    m.add_argument("action", nargs="?", choices=["list", "pull"], default="list")
    m.add_argument("name", nargs="?", default=None)
    m.add_argument("--force", action="store_true", help="fetch and convert again")
    m.set_defaults(func=_cmd_models)

    b = sub.add_parser("bench", help="time, memory and MFU of each phase, fast vs naive")
    b.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    b.add_argument("--batch", type=int, default=8, help="responses per step")
    b.add_argument("--context", type=int, default=2048, help="context tokens")
    b.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    b.add_argument("--response", type=int, default=256, help="response tokens (EOS suppressed)")
    b.add_argument("--micro-batch", type=int, default=4)
    b.add_argument("--lora", action="store_true", help="LoRA instead of full fine-tuning")
    b.add_argument("--steps", type=int, default=1, help="OPCD steps per step/update job")
    b.add_argument("--top-k", type=int, default=256)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--phases", default="teacher,step", help="comma list of teacher, step, update")
    b.add_argument("--modes", default="fast,naive",
                   help="comma list of fast, naive, ovd (whole OVD steps, same responses per step)")
    b.add_argument("--ovd-group", type=int, default=2, help="mode ovd: responses per prompt")
    b.add_argument("--output", default="benchmarks/results.md", help="append results here ('' = no file)")
    b.add_argument("--in-process", action="store_true",
                   help="run every job in this process (faster; peak memory is then shared)")
    b.add_argument("overrides", nargs="*", help="config overrides for step/update, e.g. train.gradient_checkpointing=true")
    b.set_defaults(func=_cmd_bench)

    x = sub.add_parser("extract", help="extract experience (insights) for a task's context")
    x.add_argument("config", help="YAML config (its task, model and extract sections)")
    x.add_argument("overrides", nargs="*", help="dotted overrides, e.g. extract.runs=3")
    x.add_argument("--overwrite", action="store_true", help="start again in extract.dir")
    x.add_argument("--quiet", action="store_true")
    x.set_defaults(func=_cmd_extract)

    c = sub.add_parser("compare", help="table of base / in-context / off-policy CD / OPCD ...")
    c.add_argument("spec", nargs="?", default=None, help="YAML spec (tasks, rows, eval, output)")
    c.add_argument("--runs", nargs="+", default=None, help="run folders (instead of a spec)")
    c.add_argument("--task", action="append", default=None, help="extra task column (repeatable)")
    c.add_argument("--split", default="eval")
    c.add_argument("--base", default=None, help="base model (default: the first run's model)")
    c.add_argument("--size", type=int, default=None)
    c.add_argument("--max-new-tokens", type=int, default=None)
    c.add_argument("--temperature", type=float, default=None)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--output", default=None, help="output folder (default: the spec's, runs/compare)")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=_cmd_compare)

    ch = sub.add_parser("chat", help="chat with a model or a run's final model, with or without "
                        "the context (reads stdin; /reset, /exit)")
    ch.add_argument("model", metavar="MODEL_OR_RUN",
                    help="a run folder (its final/ model), packaged name, model folder or .gguf")
    ch.add_argument("--context", default=None, metavar="TEXT", help="the context (system prompt)")
    ch.add_argument("--context-file", default=None, metavar="PATH",
                    help="a file holding the context (its non-blank lines)")
    ch.add_argument("--side-by-side", action="store_true",
                    help="two answers per turn: the model without and with the context (a run "
                    "folder's own context unless --context is given)")
    ch.add_argument("--compare-base", action="store_true",
                    help="run folder only: the run's base model with the context beside the "
                    "distilled model without it")
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    ch.add_argument("--top-p", type=float, default=1.0)
    ch.add_argument("--seed", type=int, default=0, help="the same seed gives the same answers")
    ch.set_defaults(func=_cmd_chat)

    pu = sub.add_parser("push", help="upload a run's final model with a generated model card "
                        "to the Hugging Face hub")
    pu.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (config.yaml, final/)")
    pu.add_argument("repo_id", metavar="REPO_ID", nargs="?", default=None,
                    help="user/name or org/name (default: the run's run.push_to_hub)")
    vis = pu.add_mutually_exclusive_group()
    vis.add_argument("--private", dest="private", action="store_const", const=True, default=None,
                     help="create the repo private (default: the run's run.hub_private, true)")
    vis.add_argument("--public", dest="private", action="store_const", const=False,
                     help="create the repo public")
    pu.set_defaults(func=_cmd_push)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from opcd.runtime.compat import quiet_library_warnings

    quiet_library_warnings()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (TrainingInterrupted, CollapseError) as e:  # saved first: say so, own exit code
        print(f"opcd: {e}", file=sys.stderr)
        return e.exit_code
    except OpcdError as e:
        print(f"opcd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a second signal (or Ctrl-C outside training)
        print("opcd: interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)


if __name__ == "__main__":
    sys.exit(main())
