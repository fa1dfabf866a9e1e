"""``python -m llm_dvfs.lm_eval [lm-eval arguments]``: lm-eval's command line, with the
``llm_dvfs-hf`` model registered.

Every argument is lm-eval's (``--model``, ``--model_args``, ``--tasks``, ``--include_path``,
``--limit``, ``--output_path``, ...; ``--help`` lists them). ``--model`` defaults to
``llm_dvfs-hf`` here. Example::

    python -m llm_dvfs.lm_eval --tasks hellaswag --limit 100 --output_path runs/hs/lm_eval \\
        --model_args pretrained=meta-llama/Llama-3.2-1B,dtype=bfloat16,batch_size=8,out=runs/hs

Exit status: lm-eval's; 2 when lm-eval is not installed.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run lm-eval's CLI on ``argv`` (default ``sys.argv[1:]``) with ``llm_dvfs-hf`` registered."""
    from llm_dvfs.lm_eval import MODEL_NAME, register

    try:
        register()
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = list(sys.argv[1:] if argv is None else argv)
    given = any(a in ("--model", "-M") or a.startswith("--model=") for a in args)
    if args and not given and args[0] not in ("ls", "validate") and not {"-h", "--help"} & set(args):
        args += ["--model", MODEL_NAME]  # at the end: lm-eval looks for its sub-command first
    # lm-eval's CLI reads sys.argv itself (it inserts its 'run' sub-command there)
    saved = sys.argv
    sys.argv = [saved[0] if saved else "llm_dvfs.lm_eval"] + args
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
