"""Tasks: where prompts come from and how the quality of an answer is scored.

Four tasks, by name (:func:`list_tasks`):

=============  ===========================  ==================  =======================  ==========
name           Hugging Face dataset          split (default)     quality metric           scoring
=============  ===========================  ==================  =======================  ==========
``synthetic``  — (generated offline)          —                   none                     none
``boolq``      ``google/boolq``              validation          ``accuracy``             generate
``hellaswag``  ``Rowan/hellaswag``           validation          ``acc_norm``             loglik
``truthfulqa`` ``truthfulqa/truthful_qa``    validation          ``rougeL_f1_diff``       generate
               (config ``generation``)
=============  ===========================  ==================  =======================  ==========

``scoring`` tells a runner how to obtain what :meth:`Task.score` needs:

* ``generate``: the generated text (only the new tokens, decoded).
* ``loglik``: the log-likelihood of each of ``sample.choices`` after ``sample.prompt``, from
  :func:`llm_dvfs.workload.scoring.sample_logliks` (one batched forward pass; run it outside measured windows).
* ``none``: no metric; :meth:`Task.score` returns NaN.

A task is chosen with a spec string ``NAME[:key=value,...]`` or a dict, e.g.
``"boolq:file=dev.jsonl,question=q,passage=p,answer=a"`` reads a local JSONL/CSV/Parquet file
whose columns ``q``, ``p``, ``a`` hold the question, passage and answer (see :func:`get_task`).

Hugging Face datasets are loaded lazily, through ``datasets.load_dataset``; when they are neither
cached nor downloadable, :class:`~llm_dvfs.errors.DataNotFound` says how to get them.
"""
from __future__ import annotations

from llm_dvfs.workload.tasks.base import (DEFAULT_TASK, LoglikResult, Sample, Task, get_task,
                                          list_tasks, parse_task_spec, register_task)
from llm_dvfs.workload.tasks.boolq import BoolQTask
from llm_dvfs.workload.tasks.hellaswag import HellaSwagTask
from llm_dvfs.workload.tasks.metrics import rouge_l_f1, rouge_tokens
from llm_dvfs.workload.tasks.synthetic import SyntheticTask
from llm_dvfs.workload.tasks.truthfulqa import TRUTHFULQA_PRIMER, TruthfulQATask

# registration order is list_tasks() order: the default first
register_task("synthetic", SyntheticTask)
register_task("boolq", BoolQTask)
register_task("hellaswag", HellaSwagTask)
register_task("truthfulqa", TruthfulQATask)

__all__ = ["Sample", "LoglikResult", "Task", "BoolQTask", "HellaSwagTask", "TruthfulQATask",
           "SyntheticTask", "get_task", "list_tasks", "parse_task_spec", "rouge_l_f1",
           "rouge_tokens", "TRUTHFULQA_PRIMER", "DEFAULT_TASK", "register_task"]
