"""lm-evaluation-harness tasks with llm_dvfs's meter: the ``llm_dvfs-hf`` model.

Any harness task runs through a Hugging Face model loaded by llm_dvfs, every request measured
(energy, latency, tokens, per task totals) into an llm_dvfs run directory, while the harness
builds the prompts and scores the answers::

    pip install 'llm_dvfs[lm-eval]'
    python -m llm_dvfs.lm_eval --model llm_dvfs-hf --tasks hellaswag \\
        --model_args pretrained=meta-llama/Llama-3.2-1B,dtype=bfloat16,batch_size=8,out=runs/hs

or from Python, after :func:`register` (importing :mod:`llm_dvfs.lm_eval.model` registers the
model)::

    import lm_eval, llm_dvfs.lm_eval
    llm_dvfs.lm_eval.register()
    lm_eval.simple_evaluate(model="llm_dvfs-hf", model_args="pretrained=arch:tiny,out=RUN_DIR",
                            tasks=["hellaswag"])

lm-eval (0.4.13, the version this is tested with) has no plugin discovery for models: its own
``lm_eval`` command does not know ``llm_dvfs-hf``; ``python -m llm_dvfs.lm_eval`` is that
command with the model registered. Importing this package does not import lm_eval.

Modules: ``model`` (the LM subclass), ``batches`` (windows around model calls, the energy split
rule), ``stopping`` (generate_until's stop sequences), ``record`` (rows, totals, run directory).
"""
from __future__ import annotations

from llm_dvfs.lm_eval.record import MODEL_NAME


def register() -> type:
    """Register ``llm_dvfs-hf`` with lm-eval (idempotent) and return the model class.

    Raises:
        ImportError: lm-eval is not installed (``pip install 'llm_dvfs[lm-eval]'``).
    """
    try:
        from llm_dvfs.lm_eval.model import LlmDvfsLM
    except ImportError as e:
        if e.name is not None and e.name.split(".")[0] == "lm_eval":
            raise ImportError(f"{MODEL_NAME} needs lm-evaluation-harness: pip install 'llm_dvfs[lm-eval]' "
                              f"(or pip install lm-eval); {e}") from e
        raise
    return LlmDvfsLM


__all__ = ["MODEL_NAME", "register"]
