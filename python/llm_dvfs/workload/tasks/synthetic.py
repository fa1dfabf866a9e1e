"""Synthetic prompts generated offline, spanning controlled input features."""
from __future__ import annotations

import math
import random
from typing import Any

from llm_dvfs.errors import ConfigError
from llm_dvfs.workload.configs import textgen
from llm_dvfs.workload.tasks.base import Sample, Task


class SyntheticTask(Task):
    """Prompts generated offline, deterministic by seed, spanning controlled input features.

    Sample ``i`` of seed ``s`` depends only on ``(s, i)`` (so a larger limit extends a smaller
    one). Each draws, independently:

    * a length, log-uniform in ``[min_words, max_words]`` words (default 16..1024), exact;
    * a vocabulary fraction, log-uniform in [0.02, 1] (low = repetitive text: low token entropy
      and type-token ratio);
    * a digit rate, 0 for half of the samples, else uniform in (0, ``max_digit_rate``]
      (numbers, years, percentages and codes: raises character entropy and digit ratio);
    * a named-entity density, uniform in [0, ``max_entity_density``] entities per word (people,
      places, organisations from the shipped name lists).

    The drawn values are in ``sample.metadata``. No quality metric.
    """
    name = "synthetic"
    metric = ""
    scoring = "none"
    default_template = "{text}"
    fields = ()
    optional_fields = ()

    def __init__(self, *, min_words: int = 16, max_words: int = 1024,
                 max_entity_density: float = 0.25, max_digit_rate: float = 0.2,
                 template: str | None = None, **kw: Any) -> None:
        if kw:
            raise ConfigError(f"synthetic: unknown option(s) {', '.join(sorted(kw))}; options: "
                              "min_words, max_words, max_entity_density, max_digit_rate, template")
        super().__init__(template=template)
        self.min_words, self.max_words = int(min_words), int(max_words)
        if not 1 <= self.min_words <= self.max_words:
            raise ConfigError(f"synthetic: need 1 <= min_words <= max_words, got "
                              f"{self.min_words}..{self.max_words}")
        self.max_entity_density = float(max_entity_density)
        self.max_digit_rate = float(max_digit_rate)
        if not 0 <= self.max_entity_density <= 0.5:
            raise ConfigError("synthetic: max_entity_density must be in [0, 0.5]")
        if not 0 <= self.max_digit_rate <= 1:
            raise ConfigError("synthetic: max_digit_rate must be in [0, 1]")

    def source(self) -> str:
        return "generated"

    def records(self) -> list[dict[str, Any]]:  # pragma: no cover - not used
        raise ConfigError("the synthetic task has no records; use samples()")

    def samples(self, limit: int | None = None, seed: int | None = 0) -> list[Sample]:
        """``limit`` generated samples (default 100)."""
        n = 100 if limit is None else int(limit)
        if n < 1:
            raise ConfigError(f"sample limit must be >= 1, got {limit}")
        seed = 0 if seed is None else int(seed)
        return [self._sample(seed, i) for i in range(n)]

    def _sample(self, seed: int, i: int) -> Sample:
        rng = random.Random(f"synthetic/{seed}/{i}")
        lo, hi = math.log(self.min_words), math.log(self.max_words + 1)
        n_words = min(self.max_words, max(self.min_words, int(math.exp(rng.uniform(lo, hi)))))
        vocab_fraction = math.exp(rng.uniform(math.log(0.02), 0.0))
        digit_rate = 0.0 if rng.random() < 0.5 else rng.uniform(0.0, self.max_digit_rate)
        entity_density = rng.uniform(0.0, self.max_entity_density)
        text, info = textgen.generate_text(rng, n_words, vocab_fraction=vocab_fraction,
                                           entity_density=entity_density, digit_rate=digit_rate)
        meta = {"n_words": n_words, "vocab_fraction": round(vocab_fraction, 4),
                "digit_rate": round(digit_rate, 4),
                "entity_density_target": round(entity_density, 4),
                "n_entities": info["n_entities"], "entity_density": info["entity_density"]}
        return Sample(f"synthetic/{seed}/{i}", self.template.format(text=text), metadata=meta)

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "source": "generated", "metric": "", "scoring": "none",
                "template": self.template, "stop": list(self.stop), "min_words": self.min_words,
                "max_words": self.max_words, "max_entity_density": self.max_entity_density,
                "max_digit_rate": self.max_digit_rate}
