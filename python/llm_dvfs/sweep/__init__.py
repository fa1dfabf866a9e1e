"""The sweep: models × clock points × tasks × batch sizes × repeats → one run directory.

Three steps, one module each (data flows config → plan → execute; :mod:`.rundir` knows the files):

1. :mod:`llm_dvfs.sweep.config` — :func:`load_config` / :class:`SweepConfig`: the grid from a
   TOML/YAML/JSON file and/or flags; unknown keys are rejected with a did-you-mean.
2. :mod:`llm_dvfs.sweep.plan` — :func:`prepare` → :class:`Plan`: every check that can fail on
   user input, before any GPU work and before anything is written.
3. :mod:`llm_dvfs.sweep.execute` — :func:`execute` runs the plan, writing each finished cell at
   once (resumable).

This package exports the public API below for convenience; the modules import each other
directly, never through it. The function ``execute`` is not exported here: it would shadow the
module :mod:`llm_dvfs.sweep.execute` (``from llm_dvfs.sweep.execute import execute``).
"""
from llm_dvfs.sweep.config import (DEFAULT_CPU_MODEL, DEFAULT_GPU_MODEL, EMBEDDED_DEFAULT_CPU,
                                   EMBEDDED_DEFAULT_GPU, FIELD_HELP, SweepConfig, config_from_mapping,
                                   embedded_default, load_config, load_config_file, parse_clock_spec,
                                   resume_config)
from llm_dvfs.sweep.execute import SweepResult
from llm_dvfs.sweep.plan import (Cell, ClockPoint, GpuBusy, Plan, busy_processes, check_busy, prepare,
                                 resolve_clocks)
from llm_dvfs.sweep.rundir import RunDir

__all__ = ["SweepConfig", "FIELD_HELP", "load_config", "load_config_file", "config_from_mapping",
           "parse_clock_spec", "resolve_clocks", "ClockPoint", "Cell", "Plan", "prepare",
           "SweepResult", "RunDir", "GpuBusy", "busy_processes", "check_busy", "DEFAULT_GPU_MODEL",
           "DEFAULT_CPU_MODEL", "EMBEDDED_DEFAULT_GPU", "EMBEDDED_DEFAULT_CPU", "embedded_default",
           "resume_config"]
