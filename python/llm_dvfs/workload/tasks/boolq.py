"""BoolQ yes/no question answering."""
from __future__ import annotations

import re
from typing import Any, Mapping

from llm_dvfs.errors import ConfigError
from llm_dvfs.workload.tasks.base import Sample, Task
from llm_dvfs.workload.tasks.metrics import argmax, logliks


class BoolQTask(Task):
    """BoolQ yes/no question answering (Clark et al., 2019), prompt as in lm-evaluation-harness.

    Scored by generation: the first word of the generated text must be ``yes`` or ``no`` (case and
    leading punctuation ignored) and match the answer; anything else scores 0. Given the two
    log-likelihoods of ``sample.choices`` = (" no", " yes") instead, the larger one is the answer.
    Generation stops at the first newline (``stop``): the answer is one word on the answer line.
    """
    name = "boolq"
    metric = "accuracy"
    scoring = "generate"
    default_template = "{passage}\nQuestion: {question}\nAnswer:"
    stop = ("\n",)
    dataset_id = "google/boolq"
    fields = ("question", "passage", "answer")

    def make_sample(self, rec: Mapping[str, Any]) -> Sample:
        q = str(rec["question"]).strip()
        if not q.endswith("?"):
            q += "?"
        ans = _parse_bool(rec["answer"], self.name)
        prompt = self.template.format(passage=str(rec["passage"]).strip(), question=q)
        return Sample(self.sample_id(rec), prompt, reference="yes" if ans else "no",
                      choices=(" no", " yes"), label=int(ans))

    def score(self, sample: Sample, output) -> float:
        if isinstance(output, str):
            m = re.match(r"[\W_]*(yes|no)\b", output.strip().lower())
            return float(m is not None and m.group(1) == sample.reference)
        lls = logliks(output)
        return float(argmax(lls) == sample.label)


def _parse_bool(v: Any, task: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    s = str(v).strip().lower()
    if s in ("true", "yes", "1", "y", "t"):
        return True
    if s in ("false", "no", "0", "n", "f"):
        return False
    # numpy bools
    try:
        import numpy as np
        if isinstance(v, np.bool_):
            return bool(v)
    except ImportError:  # pragma: no cover
        pass
    raise ConfigError(f"task {task}: answer {v!r} is not a yes/no value")
