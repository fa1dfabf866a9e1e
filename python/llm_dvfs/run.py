"""``python -m llm_dvfs.run``: the sweep over models × tasks × clock points × batch sizes (or,
for served traffic, load levels: ``--engine continuous`` / ``--endpoint URL``).

With no arguments it runs the embedded default (a small ``arch:`` model with random weights on
the synthetic task; on the GPU if there is one, else on the CPU without energy), in about a
minute, and prints where the results are and how to read them. See ``--help`` and docs/sweep.md.

Exit status: 0 done; 2 bad input (config, model, task, clock, output directory, busy GPU with
``--on-busy-gpu refuse``, a run directory owned by another live process), nothing written; 1 a
failure during the run, or a finished cell found damaged at the end (finished cells are kept:
``--resume DIR``); 130, 143, 129 interrupted by SIGINT (Ctrl-C), SIGTERM, SIGHUP (clocks restored,
manifest ``interrupted``, resumable: the command is printed). See :mod:`llm_dvfs.sweep.signals`.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from llm_dvfs import errors

EXAMPLES = """\
examples:
  python -m llm_dvfs.run
      the embedded default: a small arch: model on the synthetic task, ~1 minute
  python -m llm_dvfs.run --models arch:llama-3.2-1b,arch:gpt-neo-2.7b --batch-sizes 1,8 \\
      --samples 50 --dtype bfloat16 --ner heuristic --out runs/observe
      observe mode: the GPU's clocks as found, nothing changed (--ner heuristic: no nltk data
      needed; the default --ner nltk says which nltk.download packages it lacks)
  sudo -E python -m llm_dvfs.run --models arch:llama-3.2-1b --clocks 1980,1500,1200 \\
      --allow-clock-changes --out runs/dvfs
      three SM clock points (restored afterwards, also after a crash)
  python -m llm_dvfs.run --clocks 600:1980:120 --mem-clocks all --allow-clock-changes
  python -m llm_dvfs.run --clocks all --power-limits 700,500 --allow-clock-changes
  python -m llm_dvfs.run --tasks 'boolq:file=dev.jsonl,question=q,passage=p,answer=a' \\
      --models ./my-checkpoint --max-new-tokens 8
  python -m llm_dvfs.run --models meta-llama/Llama-3.2-1B-Instruct --apply-chat-template \\
      --model-args revision=main,attn_implementation=sdpa --tasks boolq --limit 100
      a chat model as chat (its template, its generation_config's EOS ids), pinned: each row
      records the commit the revision resolved to
  python -m llm_dvfs.run --config sweep.toml --no-fixed-output-length
      (keys = the long option names; every on/off setting has a --no- form that wins over the file)
  python -m llm_dvfs.run --models arch:llama-3.2-1b --dtype bfloat16 --engine continuous \\
      --concurrency 1,4,16 --samples 64 --warmup-requests 4 --cooldown-requests 4 --out runs/served
      served traffic: HF continuous batching at three loads (closed loop); --arrival-rate 2,8
      gives Poisson arrivals instead (seeded by --seed)
  vllm serve meta-llama/Llama-3.2-1B-Instruct --port 8000 &   # on this host's GPU
  python -m llm_dvfs.run --endpoint http://localhost:8000 --concurrency 1,8 --samples 64
      an OpenAI-compatible server measured from outside (energy split by token timestamps)
  python -m llm_dvfs.run --resume runs/dvfs --allow-clock-changes
      continue an interrupted run: finished cells are kept, the rest is run
  python -m llm_dvfs.run --models arch:llama-3.2-1b --clocks 1980,1200 --allow-clock-changes --gpus all
      the same sweep, cells spread over every GPU (one worker each); --ray local or --ray auto
      schedules them as Ray actors (pip install 'llm_dvfs[ray]'), on every node of a cluster
  python -m llm_dvfs.run --dry-run --config sweep.toml  validate and show the plan only

config file (TOML; YAML and JSON work the same, a [sweep] table is optional):
  models = ["arch:llama-3.2-1b", "meta-llama/Llama-3.2-1B"]
  tasks = ["synthetic", "boolq:file=data/boolq.jsonl"]
  clocks = "1980,1500,1200"          # or "all", "600:1980", "600:1980:120", [1980, 1500]
  batch_sizes = [1, 8]
  samples = 50
  max_new_tokens = 64
  fixed_output_length = true
  model_args = { attn_implementation = "sdpa" }
  dtype = "bfloat16"
  out = "runs/llama-dvfs"

clock points other than the GPU as found need --allow-clock-changes (and root); without it the
sweep runs in observe mode and says so. Results: DIR/requests.parquet (one row per request),
tokens.parquet, power.parquet, requests.csv, summary.csv, manifest.json; read them with
`python -m llm_dvfs.report DIR`.

exit status: 0 done, 2 bad input or run directory in use (nothing written), 1 failure during
the run (resumable), 130/143/129 interrupted by SIGINT/SIGTERM/SIGHUP (resumable)."""

# (flag, config key, metavar / action, help) — help texts come from llm_dvfs.sweep.config.FIELD_HELP
_VALUE_FLAGS = [
    ("--models", "models", "SPEC[,SPEC...]"),
    ("--model-args", "model_args", "KEY=VALUE[,...]"),
    ("--tasks", "tasks", "TASK[,TASK...]"),
    ("--clocks", "clocks", "MHZ"),
    ("--mem-clocks", "mem_clocks", "MHZ"),
    ("--power-limits", "power_limits", "W[,W...]"),
    ("--batch-sizes", "batch_sizes", "N[,N...]"),
    ("--repeats", "repeats", "N"),
    ("--samples", "samples", "N"),
    ("--max-new-tokens", "max_new_tokens", "N"),
    ("--dtype", "dtype", "DTYPE"),
    ("--decoding", "decoding", "greedy|sampled"),
    ("--temperature", "temperature", "T"),
    ("--top-p", "top_p", "P"),
    ("--seed", "seed", "N"),
    ("--warmup", "warmup", "N"),
    ("--idle-s", "idle_s", "S"),
    ("--settle-tolerance-mhz", "settle_tolerance_mhz", "MHZ"),
    ("--ner", "ner", "nltk|heuristic|off"),
    ("--out", "out", "DIR"),
    ("--device", "device", "DEV"),
    ("--gpu", "gpu", "N|auto|none"),
    ("--on-busy-gpu", "on_busy_gpu", "warn|refuse"),
]
# served traffic (issue 15: llm_dvfs.sweep.served), a group of their own in --help
_SERVED_FLAGS = [
    ("--engine", "engine", "generate|continuous|endpoint"),
    ("--endpoint", "endpoint", "URL"),
    ("--endpoint-api", "endpoint_api", "completions|chat"),
    ("--endpoint-model", "endpoint_model", "NAME"),
    ("--concurrency", "concurrency", "N[,N...]"),
    ("--arrival-rate", "arrival_rate", "R[,R...]"),
    ("--arrival-trace", "arrival_trace", "FILE"),
    ("--warmup-requests", "warmup_requests", "N"),
    ("--cooldown-requests", "cooldown_requests", "N"),
    ("--warmup-s", "warmup_s", "S"),
    ("--cooldown-s", "cooldown_s", "S"),
    ("--request-timeout-s", "request_timeout_s", "S"),
    ("--prefill-weight", "prefill_weight", "W"),
    ("--cb-cache-tokens", "cb_cache_tokens", "N"),
]
# parallel sweeps (issue 16: llm_dvfs.sweep.parallel); --ray is added apart (its ADDRESS is optional)
_PARALLEL_FLAGS = [
    ("--gpus", "gpus", "N[,N...]|all"),
    ("--gpus-per-model", "gpus_per_model", "N"),
]
# on/off settings: each also has its --no- form (argparse.BooleanOptionalAction), so a value
# from --config can be turned off on the command line; None = not given (the file decides)
_SWITCH_FLAGS = [
    ("--fixed-output-length", "fixed_output_length"),
    ("--stop-sequences", "stop_sequences"),
    ("--apply-chat-template", "apply_chat_template"),
    ("--allow-clock-changes", "allow_clock_changes"),
]
#: Flags that may accompany the embedded default (they do not describe the grid).
_EMBEDDED_OK = {"out", "device", "gpu", "on_busy_gpu", "allow_clock_changes", "gpus", "gpus_per_model", "ray"}
_ALIASES = {"models": ["--model", "-m"], "tasks": ["--task", "-t"], "out": ["-o"],
            "batch_sizes": ["--batch-size"], "samples": ["--limit"]}  # --limit: lm-eval's name


def build_parser(prog: str = "python -m llm_dvfs.run") -> argparse.ArgumentParser:
    from llm_dvfs.sweep.config import FIELD_HELP

    p = argparse.ArgumentParser(
        prog=prog,
        description="Measure energy, latency and quality of LLM inference over models x tasks x GPU "
                    "clock points x batch sizes, and write a run directory (resumable). Settings "
                    "come from --config and flags (flags win); with no arguments an embedded "
                    "default runs in about a minute.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", metavar="FILE", help="TOML, YAML or JSON file with any of the "
                   "settings below (keys are the long option names, with _ or -)")
    g = p.add_argument_group("grid and generation")
    for flag, key, metavar in _VALUE_FLAGS:
        g.add_argument(flag, *_ALIASES.get(key, []), dest=key, metavar=metavar, default=None,
                       help=FIELD_HELP[key])
    for flag, key in _SWITCH_FLAGS:
        g.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None,
                       help=FIELD_HELP[key])
    # the formatter keeps descriptions as written (RawDescriptionHelpFormatter): wrapped here
    s = p.add_argument_group(
        "served traffic", "requests arriving over time and sharing the GPU (docs/serving.md): the continuous\n"
        "engine runs the model in this process; --endpoint measures an OpenAI-compatible server, whose\n"
        "GPU must be on this host (the power monitor measures this host's GPU, --gpu). Load levels\n"
        "replace batch sizes as an axis of the grid.")
    for flag, key, metavar in _SERVED_FLAGS:
        s.add_argument(flag, dest=key, metavar=metavar, default=None, help=FIELD_HELP[key])
    m = p.add_argument_group(
        "across GPUs and machines", "cells run in parallel, one worker per GPU (README: \"Running across GPUs and\n"
        "machines\"); the run directory, the safety and the report stay the same")
    for flag, key, metavar in _PARALLEL_FLAGS:
        m.add_argument(flag, dest=key, metavar=metavar, default=None, help=FIELD_HELP[key])
    m.add_argument("--ray", dest="ray", metavar="ADDRESS", nargs="?", const="auto", default=None,
                   help=FIELD_HELP["ray"] + " (--ray alone: auto)")
    r = p.add_argument_group("run control")
    r.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR (its manifest "
                   "holds the settings; finished cells are kept)")
    r.add_argument("--dry-run", action=argparse.BooleanOptionalAction, default=False,
                   help="validate everything and print the plan; run nothing, write nothing")
    # plain flags: no config file sets them (nothing to turn off), and a --no-quiet would count
    # as using --quiet in this mutually exclusive group
    v = r.add_mutually_exclusive_group()
    v.add_argument("--quiet", "-q", action="store_true", help="warnings and the summary only; no progress bars")
    v.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return p


def _setup_logging(quiet: bool, verbose: bool) -> logging.Handler:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    # a plain console handler: while the sweep's progress bars are up, execute() routes it
    # through tqdm (tqdm.contrib.logging.logging_redirect_tqdm), so lines don't break the bars
    h = logging.StreamHandler(sys.stderr)
    h.setLevel(level)
    h.setFormatter(logging.Formatter("llm_dvfs: %(message)s" if not verbose
                                     else "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("llm_dvfs", "py.warnings"):
        lg = logging.getLogger(name)
        lg.addHandler(h)
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
    logging.captureWarnings(True)
    return h


def _teardown_logging(h: logging.Handler) -> None:
    for name in ("llm_dvfs", "py.warnings"):
        logging.getLogger(name).removeHandler(h)
    logging.captureWarnings(False)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = ([k for _, k, _ in _VALUE_FLAGS + _SERVED_FLAGS + _PARALLEL_FLAGS] + [k for _, k in _SWITCH_FLAGS]
            + ["ray"])
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m llm_dvfs.run") -> int:
    """Entry point; returns the exit status (see the module docstring). ``prog`` names the
    command in usage lines (``llm-dvfs run`` from the console script)."""
    from llm_dvfs.sweep import signals

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    handler = _setup_logging(args.quiet, args.verbose)
    command = ["python", "-m", "llm_dvfs.run", *(argv if argv is not None else sys.argv[1:])]
    state: dict[str, Any] = {}  # what _main got to: the plan, once made
    try:
        with signals.handled():
            try:
                return _main(args, command, state)
            except KeyboardInterrupt as e:  # SIGINT, SIGTERM, SIGHUP (signals.SignalExit)
                signals.acknowledge()
                _print_interrupted(e, state.get("plan"), args)
                return signals.exit_status(e)
    finally:
        _teardown_logging(handler)


def _print_interrupted(e: BaseException, plan: Any, args: argparse.Namespace) -> None:
    from llm_dvfs.sweep.rundir import RunDir
    from llm_dvfs.sweep.signals import signal_name

    out = plan.out if plan is not None else args.resume
    sweep_mode = plan is not None and plan.mode == "sweep" or (plan is None and args.allow_clock_changes)
    if out is not None and RunDir(out).has_manifest():
        print(f"\nllm_dvfs.run: interrupted ({signal_name(e)}); finished cells are in {out}. Continue with:\n"
              f"  python -m llm_dvfs.run --resume {out}" + (" --allow-clock-changes" if sweep_mode else ""),
              file=sys.stderr)
    else:
        print(f"\nllm_dvfs.run: interrupted ({signal_name(e)}) before the run directory was created; nothing "
              "was written. Run the same command again to start it.", file=sys.stderr)


def _main(args: argparse.Namespace, command: list[str], state: dict[str, Any]) -> int:
    from llm_dvfs.sweep import lock as run_lock
    from llm_dvfs.sweep import signals
    from llm_dvfs.sweep.config import embedded_default, load_config, resume_config
    from llm_dvfs.sweep.execute import execute
    from llm_dvfs.sweep.plan import GpuBusy, prepare

    log = logging.getLogger("llm_dvfs.run")
    # a resume owns its directory before it reads the manifest (a second one stops here, rc 2)
    # (only a run directory: a typo'd --resume must not get a .lock file; resume_config says why)
    from llm_dvfs.sweep.rundir import RunDir
    owned = args.resume and RunDir(Path(args.resume).expanduser()).has_manifest()
    owner = run_lock.hold(Path(args.resume).expanduser(), command) if owned else contextlib.nullcontext()
    try:
        owner.__enter__()
    except errors.ConfigError as e:
        print(f"llm_dvfs.run: error: {e}", file=sys.stderr)
        return 2
    try:
        overrides = _overrides(args)
        try:
            if args.resume:
                if args.config:
                    raise errors.ConfigError("--resume takes the settings from the run's manifest; "
                                             "don't pass --config")
                cfg = resume_config(args.resume, overrides)
                plan = prepare(cfg, resume=args.resume)
            else:
                if args.config is None and not (set(overrides) - _EMBEDDED_OK):
                    # nothing about the grid was said: the embedded default
                    overrides = {**embedded_default(overrides.get("device", "auto")), **overrides}
                    log.info("no grid given: running the embedded default (a small arch: model with "
                             "random weights on the synthetic task); see --help for the options")
                cfg = load_config(args.config, overrides)
                plan = prepare(cfg)
        except (errors.ConfigError, errors.DataNotFound, GpuBusy, errors.ClockChangeNotAllowed) as e:
            print(f"llm_dvfs.run: error: {e}", file=sys.stderr)
            return 2
        state["plan"] = plan
        signals.raise_pending()  # a signal deferred during an import: nothing is written yet
        for line in plan.describe().splitlines():
            log.info("%s", line)
        if args.dry_run:
            for n in plan.notes:
                log.warning("%s", n)
            print(plan.describe())
            print("dry run: nothing was run or written")
            return 0
        try:
            res = execute(plan, argv=command, quiet=args.quiet)
            from llm_dvfs.analysis.console import write_summary  # after the run: scipy & co. load late
            _, summary_text = write_summary(res.out, res.requests)  # DIR/summary.csv
        except (errors.ConfigError, errors.DataNotFound) as e:
            print(f"llm_dvfs.run: error: {e}", file=sys.stderr)
            return 2
        except errors.LlmDvfsError as e:
            print(f"llm_dvfs.run: error during the run: {type(e).__name__}: {e}\nFinished cells are kept; "
                  f"continue with: python -m llm_dvfs.run --resume {plan.out}", file=sys.stderr)
            return 1
        _print_result(res, plan, summary_text)
        if res.status == "incomplete":
            print(f"llm_dvfs.run: a finished cell was found damaged and moved to {plan.out}/damaged/; run it "
                  f"again with: python -m llm_dvfs.run --resume {plan.out}"
                  + (" --allow-clock-changes" if plan.mode == "sweep" else ""), file=sys.stderr)
        return 0 if res.status == "complete" else 1
    finally:
        owner.__exit__(None, None, None)


def _print_result(res: Any, plan: Any, summary_text: str) -> None:
    out = res.out
    print()
    print(f"llm_dvfs sweep {res.status}: {len(res.requests)} requests, {res.cells_run} cell(s) run"
          + (f", {res.cells_skipped} already done" if res.cells_skipped else "") + f"; mode: {plan.mode}")
    for n in res.notes:
        print(f"note: {n}")
    print()
    print("Summary (medians per model x task x batch size x clock point; dE/dLat vs the highest clock):")
    print(summary_text)
    print()
    if not plan.energy_available:
        print("Energy columns are empty: no NVIDIA driver/GPU was measured (time, tokens and "
              "features only).")
    print(f"Results are in {out}/:")
    print("  requests.parquet (one row per request; requests.csv is a copy), tokens.parquet,")
    print("  power.parquet (raw power trace), summary.csv, manifest.json (config, versions), run.log")
    print("Read them with:")
    print(f"  python -m llm_dvfs.report {out}")
    print("or in Python: pandas.read_parquet('" + str(out / "requests.parquet") + "')")


if __name__ == "__main__":
    sys.exit(main())
