"""``python -m llm_dvfs CMD ...``: the same as the ``llm-dvfs`` console script."""
import sys

from llm_dvfs.cli import main

sys.exit(main())
