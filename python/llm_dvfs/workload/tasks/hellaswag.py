"""HellaSwag commonsense sentence completion."""
from __future__ import annotations

import re
from typing import Any, Mapping

from llm_dvfs.errors import ConfigError
from llm_dvfs.workload.tasks.base import Sample, Task
from llm_dvfs.workload.tasks.loaders import as_list
from llm_dvfs.workload.tasks.metrics import argmax, logliks


def _hellaswag_preprocess(text: str) -> str:
    # the same clean-up as lm-evaluation-harness' hellaswag task
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    text = text.replace("  ", " ")
    return text


class HellaSwagTask(Task):
    """HellaSwag commonsense sentence completion (Zellers et al., 2019).

    The prompt is ``"{activity_label}: {ctx}"`` (activity label optional), cleaned as in
    lm-evaluation-harness; ``choices`` are the four endings with a leading space. Scored by
    log-likelihood only: ``acc_norm`` = 1 when the ending with the highest log-likelihood per
    character of the ending (``loglik / len(choice)``) is the gold one.

    The context comes from ``ctx`` or, when the data has them (the hub dataset does), from
    ``ctx_a`` + " " + capitalised ``ctx_b`` like the harness. ``endings`` may be a list column, a
    JSON list string, or several columns joined with ``|`` in the mapping (``endings=e0|e1|e2|e3``).
    """
    name = "hellaswag"
    metric = "acc_norm"
    scoring = "loglik"
    default_template = "{activity_label}: {ctx}"
    dataset_id = "Rowan/hellaswag"
    fields = ("ctx", "endings", "label")
    optional_fields = ("id", "activity_label", "ctx_a", "ctx_b")

    def _column_optional(self, f: str, present: set) -> bool:
        # ctx may be given as ctx_a + ctx_b instead (the hub dataset has all three)
        return f == "ctx" and self.columns["ctx_a"] in present and self.columns["ctx_b"] in present

    def make_sample(self, rec: Mapping[str, Any]) -> Sample:
        explicit_ctx = self.columns["ctx"] != "ctx" and rec.get("ctx") is not None
        if not explicit_ctx and rec.get("ctx_a") is not None and rec.get("ctx_b") is not None:
            ctx = str(rec["ctx_a"]) + " " + str(rec["ctx_b"]).capitalize()
        else:
            ctx = str(rec["ctx"])
        label_txt = rec.get("activity_label")
        if label_txt is None and "{activity_label}" in self.template:
            tmpl = self.template.replace("{activity_label}: ", "").replace("{activity_label}", "")
        else:
            tmpl = self.template
        prompt = _hellaswag_preprocess(tmpl.format(ctx=ctx, activity_label=label_txt or ""))
        endings = as_list(rec["endings"])
        if len(endings) < 2:
            raise ConfigError(f"task {self.name}: sample {self.sample_id(rec)} has {len(endings)} "
                              "ending(s); need at least 2")
        try:
            label = int(rec["label"])
        except (TypeError, ValueError):
            raise ConfigError(f"task {self.name}: label {rec['label']!r} is not an integer") from None
        if not 0 <= label < len(endings):
            raise ConfigError(f"task {self.name}: label {label} out of range for {len(endings)} endings")
        choices = tuple(" " + _hellaswag_preprocess(e) for e in endings)
        return Sample(self.sample_id(rec), prompt, reference=choices[label].strip(),
                      choices=choices, label=label,
                      metadata={"activity_label": label_txt} if label_txt else {})

    def score(self, sample: Sample, output) -> float:
        if isinstance(output, str):
            raise TypeError("hellaswag is scored by log-likelihood: pass "
                            "sample_logliks(model, tokenizer, sample), not generated text")
        lls = logliks(output)
        if len(lls) != len(sample.choices):
            raise ValueError(f"{len(lls)} log-likelihoods for {len(sample.choices)} choices")
        norm = [ll / max(1, len(c)) for ll, c in zip(lls, sample.choices)]
        return float(argmax(norm) == sample.label)

    def score_details(self, sample: Sample, output) -> dict[str, float]:
        """``{"acc": raw argmax correct, "acc_norm": length-normalised argmax correct}``."""
        lls = logliks(output)
        return {"acc": float(argmax(lls) == sample.label), "acc_norm": self.score(sample, output)}
