"""``llm-dvfs``: one command with the sub-commands ``run``, ``report``, ``info`` and ``clocks``.

The console script of ``[project.scripts]`` in pyproject.toml. ``llm-dvfs CMD ARGS...`` is
``python -m llm_dvfs.CMD ARGS...``: it hands ARGS to that module's ``main`` (which parses them
and returns the exit status), so both spellings accept the same options. Sub-command modules
are imported only when chosen, so ``llm-dvfs --help`` and ``llm-dvfs info`` load no torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

#: sub-command -> (module whose main(argv, prog) runs it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("llm_dvfs.run", "the sweep: models x tasks x clock points x batch sizes, every request "
                            "measured (energy, latency, tokens, quality, input features)"),
    "report": ("llm_dvfs.report", "statistics, figures and a readable report of a run directory"),
    "info": ("llm_dvfs.info", "the visible GPUs: clocks, power limits, power sources (read-only)"),
    "clocks": ("llm_dvfs.clocks", "show clock state, reset clocks to defaults, or hold a clock lock"),
}


def _parser() -> argparse.ArgumentParser:
    from llm_dvfs import __version__

    p = argparse.ArgumentParser(
        prog="llm-dvfs",
        description="Measure and reduce the energy of LLM inference on NVIDIA GPUs.",
        epilog="Each sub-command is also `python -m llm_dvfs.CMD`; `llm-dvfs CMD --help` lists its "
               "options.\n\nexamples:\n  llm-dvfs run\n  llm-dvfs run --models arch:llama-3.2-1b "
               "--batch-sizes 1,8 --limit 50\n  llm-dvfs report runs/20260101-120000\n  llm-dvfs info --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"llm_dvfs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (_, help_text) in COMMANDS.items():
        # add_help=False: `llm-dvfs run --help` is the sub-command's own help, not this one's
        sub.add_parser(name, help=help_text, add_help=False)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``llm-dvfs``; returns the sub-command's exit status.

    Without a sub-command it prints the help and returns 2; ``--help`` prints it and exits 0
    (SystemExit, as argparse does); an unknown sub-command is a usage error (SystemExit 2).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not args or args[0] not in COMMANDS:
        ns = parser.parse_args(args[:1])  # --help, --version, or an unknown command: exits
        if ns.command is None:
            parser.print_help(sys.stderr)
            return 2
    name, rest = args[0], args[1:]
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest, prog=f"llm-dvfs {name}"))
    except BrokenPipeError:  # e.g. `llm-dvfs report DIR | head`: not an error of the command
        return 0


if __name__ == "__main__":
    sys.exit(main())
