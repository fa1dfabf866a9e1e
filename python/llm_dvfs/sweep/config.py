"""The sweep's configuration: :class:`SweepConfig`, read from a TOML/YAML/JSON file and/or flags.

One concern: turning settings (a config file, command-line flags, or a run directory's manifest for
``--resume``) into a validated :class:`SweepConfig`. Values are normalised and type-checked here
(``"1,8"`` → ``[1, 8]``, clock specs → :func:`parse_clock_spec`'s forms); unknown keys are
rejected with a did-you-mean. Checks that need the model, the data or the GPU happen in
:func:`llm_dvfs.sweep.plan.prepare`. The public names are also exported by :mod:`llm_dvfs.sweep`.

Raises :class:`~llm_dvfs.errors.ConfigError` for every bad setting.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from llm_dvfs.errors import ConfigError
from llm_dvfs.meter.served import DEFAULT_PREFILL_PER_TOKEN
from llm_dvfs.sweep.rundir import RunDir
from llm_dvfs.workload.model_args import parse_model_args

# the sweep's logger: these messages were always the sweep's (run.log and -v filters keep working)
log = logging.getLogger("llm_dvfs.sweep")

ON_BUSY = ("warn", "refuse")
ENGINES = ("generate", "continuous", "endpoint")
ENDPOINT_APIS = ("completions", "chat")
NER_MODES = ("nltk", "heuristic", "off")
DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "half", "float32", "fp32", "float")

#: The embedded default run (``python -m llm_dvfs.run`` without grid settings): it must work on a
#: fresh machine with nothing downloaded, hence the labelled heuristic entity estimator instead
#: of nltk's (whose data may be missing); ``models`` is left to the device
#: (:data:`DEFAULT_GPU_MODEL` / :data:`DEFAULT_CPU_MODEL`). Sized to take about a minute.
EMBEDDED_DEFAULT_GPU: dict[str, Any] = {"ner": "heuristic", "tasks": ["synthetic"], "samples": 16,
                                        "batch_sizes": [1, 4], "max_new_tokens": 48}
EMBEDDED_DEFAULT_CPU: dict[str, Any] = {"ner": "heuristic", "tasks": ["synthetic:max_words=256"],
                                        "samples": 12, "batch_sizes": [1, 4], "max_new_tokens": 16}


def embedded_default(device: str = "auto") -> dict[str, Any]:
    """The embedded default settings for ``device`` (auto: the GPU if torch sees one)."""
    try:
        dev = resolve_device(str(_normalise("device", device, "device")))
    except ConfigError:
        dev = "cpu"
    return dict(EMBEDDED_DEFAULT_GPU if dev.startswith("cuda") else EMBEDDED_DEFAULT_CPU)


#: Embedded default models (when ``models`` is not given): a Llama-3.2-1B-shaped model with
#: random weights on a GPU, the tiny test architecture on the CPU.
DEFAULT_GPU_MODEL = "arch:llama-3.2-1b"
DEFAULT_CPU_MODEL = "arch:tiny"


# ============================================================================================
# configuration
# ============================================================================================
@dataclass
class SweepConfig:
    """Everything a sweep needs. Field names are the config-file keys (``--flag-names`` are the
    same with dashes). See :data:`FIELD_HELP` for each field's meaning and example.

    ``None`` for ``models`` means the embedded default (:data:`DEFAULT_GPU_MODEL` on a GPU,
    :data:`DEFAULT_CPU_MODEL` on the CPU); ``None`` for ``clocks``/``mem_clocks``/
    ``power_limits`` means "as found" (not changed).
    """

    models: Optional[list[str]] = None
    model_args: dict[str, Any] = field(default_factory=dict)
    tasks: list[Any] = field(default_factory=lambda: ["synthetic"])
    clocks: Any = None
    mem_clocks: Any = None
    power_limits: Any = None
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    repeats: int = 1
    samples: int = 16
    max_new_tokens: int = 32
    fixed_output_length: bool = False
    stop_sequences: bool = True
    apply_chat_template: bool = False
    dtype: str = "auto"
    decoding: str = "greedy"
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    warmup: int = 1
    idle_s: float = 2.0
    settle_tolerance_mhz: float = 30.0
    ner: str = "nltk"
    out: Optional[str] = None
    device: str = "auto"
    gpu: Any = "auto"
    allow_clock_changes: bool = False
    on_busy_gpu: str = "warn"
    # served traffic (issue 15; llm_dvfs.sweep.served): None engine = endpoint when an endpoint
    # URL is given, else generate
    engine: Optional[str] = None
    endpoint: Optional[str] = None
    endpoint_api: str = "completions"
    endpoint_model: Optional[str] = None
    arrival_rate: Optional[list[float]] = None
    arrival_trace: Optional[str] = None
    concurrency: Optional[list[int]] = None
    warmup_requests: int = 0
    cooldown_requests: int = 0
    warmup_s: float = 0.0
    cooldown_s: float = 0.0
    request_timeout_s: float = 600.0
    prefill_weight: float = DEFAULT_PREFILL_PER_TOKEN  # measured on the H200 (docs/attribution.md)
    cb_cache_tokens: Optional[int] = None  # None: sized to the cell (sweep/served.cache_tokens_for)
    # parallel sweeps (issue 16; llm_dvfs.sweep.parallel): None gpus = the one GPU of --gpu
    gpus: Any = None
    gpus_per_model: int = 1
    ray: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_HELP: dict[str, str] = {
    "models": "model specs: hub ids, local directories or arch:NAME (random weights); "
              "e.g. arch:llama-3.2-1b,arch:gpt-neo-2.7b. Default: arch:llama-3.2-1b on a GPU, "
              "arch:tiny on the CPU",
    "model_args": "extra from_pretrained arguments for every model, as lm-eval's --model_args: "
                  "key=value,... e.g. revision=abc123,attn_implementation=sdpa or "
                  "quantization_config={\"load_in_4bit\": true} (JSON values allowed; a table "
                  "in a config file). The revision resolved is recorded per row",
    "tasks": "tasks: synthetic, boolq, hellaswag, truthfulqa, or NAME:file=PATH,field=column,... "
             "for a local file; e.g. synthetic,boolq:file=dev.jsonl (default synthetic)",
    "clocks": "SM clock points in MHz: 1980,1500,1200 | all | MIN:MAX (every supported clock "
              "between) | MIN:MAX:STEP. Needs --allow-clock-changes (else observe mode)",
    "mem_clocks": "memory clock points in MHz, same syntax as --clocks (e.g. 2619,1593)",
    "power_limits": "power limits in W, e.g. 700,500 (within the GPU's range)",
    "batch_sizes": "batch sizes, e.g. 1,8 (prompts padded on the left; default 1)",
    "repeats": "how often each cell is measured (default 1)",
    "samples": "sample limit per task (default 16; --limit is the same)",
    "max_new_tokens": "maximum generated tokens per request (default 32)",
    "fixed_output_length": "generate exactly max_new_tokens tokens (EOS and stop sequences "
                           "suppressed) for controlled comparisons",
    "stop_sequences": "end each request at its task's stop sequences, e.g. the newline after a "
                      "BoolQ or TruthfulQA answer (default on; --no-stop-sequences runs to EOS or "
                      "max_new_tokens)",
    "apply_chat_template": "give each prompt as one user turn of the tokenizer's chat template, "
                           "with the generation prompt (default off; an error when the tokenizer "
                           "has none)",
    "dtype": "model dtype: auto, bfloat16, float16, float32 (default auto: the checkpoint's)",
    "decoding": "greedy or sampled (default greedy)",
    "temperature": "sampling temperature (sampled decoding; default 1.0)",
    "top_p": "nucleus sampling p (sampled decoding; default 1.0)",
    "seed": "seed of the sample order, arch: weights and sampled decoding (default 0)",
    "warmup": "unmeasured warm-up batches after each clock change and before each cell "
              "(default 1)",
    "idle_s": "seconds of idle-power baseline per clock point (default 2; 0 = none)",
    "settle_tolerance_mhz": "observed SM clock within this of the request counts as settled "
                            "(default 30)",
    "ner": "named-entity density feature: nltk (needs the nltk data; the default), heuristic "
           "(labelled capitalisation fallback, no data needed) or off",
    "out": "run directory (default runs/<timestamp>); must not exist or be empty",
    "device": "where the model runs: auto, cpu, cuda, cuda:N (default auto)",
    "gpu": "GPU to measure and control (CUDA index), auto (the model's GPU, else GPU 0 if any) "
           "or none",
    "allow_clock_changes": "opt in to changing clocks / power limits (restored on exit)",
    "on_busy_gpu": "when other processes use the GPU: warn or refuse (default warn)",
    "engine": "generate (lock-step HF generate batches, the default), continuous (HF continuous "
              "batching: requests arrive over time and share engine steps) or endpoint (an "
              "OpenAI-compatible server, see --endpoint)",
    "endpoint": "URL of an OpenAI-compatible server (vLLM, SGLang, TGI, transformers serve), e.g. "
                "http://localhost:8000; implies --engine endpoint. The power monitor measures this "
                "host's GPU (--gpu): the server must run on this host, on that GPU",
    "endpoint_api": "completions (default) or chat (the server applies its chat template)",
    "endpoint_model": "model name sent to the endpoint (default: the first /v1/models lists)",
    "arrival_rate": "open-loop load: Poisson arrivals at R requests/s (seeded by --seed); a list "
                    "is a load axis, e.g. 1,2,4",
    "arrival_trace": "open-loop load from a file of arrival times (CSV or JSON lines, seconds "
                     "from the start)",
    "concurrency": "closed-loop load: N users, each sending its next request when its previous "
                   "one is done; a list is a load axis, e.g. 1,4,16 (default for served engines: 1)",
    "warmup_requests": "served traffic: the first N requests issued are warm-up (served and "
                       "recorded, load_phase warmup, not in the statistics; default 0)",
    "cooldown_requests": "served traffic: the last N requests issued are cool-down (default 0)",
    "warmup_s": "served traffic: seconds after the first request excluded as warm-up (default 0)",
    "cooldown_s": "served traffic: seconds before the last issue excluded as cool-down (default 0)",
    "request_timeout_s": "served traffic: a request not finished after this is failed (default 600)",
    "cb_cache_tokens": "continuous engine: KV cache capacity in tokens (default: what the cell's requests "
                       "in flight need, see docs/serving.md; transformers' own default fills the GPU's free "
                       "memory)",
    "prefill_weight": "served traffic: weight of a prompt token relative to a decode token when a "
                      "shared engine step's energy is split (default 0.31, measured on an H200 with "
                      "bench/phase_weights.py: docs/attribution.md; re-measure for other GPUs/models)",
    "gpus": "run cells in parallel on these GPUs (CUDA indices), one worker process per GPU: "
            "0,1,2,3 or all (default: the one GPU of --gpu). A model is loaded once per worker; "
            "every row names its host and GPU UUID",
    "gpus_per_model": "GPUs per model (default 1): each worker owns this many GPUs, the model is "
                      "split over them (device_map balanced; pretrained checkpoints) and its energy "
                      "is the sum over them",
    "ray": "schedule the cells as Ray actors (pip install 'llm_dvfs[ray]'): auto (the running "
           "cluster), local (a cluster of this machine's GPUs) or ray://HOST:PORT; one actor per "
           "GPU (per --gpus-per-model GPUs) on every node",
}

_FIELDS = [f.name for f in dataclasses.fields(SweepConfig)]
assert set(_FIELDS) == set(FIELD_HELP), "every config field needs its help text"


def did_you_mean(key: str, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid name, or ''."""
    m = difflib.get_close_matches(key.replace("-", "_"), list(valid), n=1, cutoff=0.6)
    return f" (did you mean {m[0]!r}?)" if m else ""


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML (.toml), YAML (.yaml/.yml) or JSON (.json) config file into a dict.

    A top-level ``[sweep]`` table, if present, is used as the config (so a file may carry other
    tables for other tools); keys are the :class:`SweepConfig` field names (dashes allowed).

    Raises:
        ConfigError: missing/unreadable file, syntax error, unknown format, not a mapping.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {e}") from None
    try:
        if suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError("YAML config files need PyYAML: pip install pyyaml (or use TOML)") from None
            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {str(p)!r}: unknown format {suffix!r}; use .toml, .yaml or .json")
    except ConfigError:
        raise
    except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError
        raise ConfigError(f"config file {str(p)!r} is not valid {suffix[1:].upper()}: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a table of settings, got {type(data).__name__}")
    if "sweep" in data and isinstance(data["sweep"], dict):
        data = data["sweep"]
    return data


def config_from_mapping(data: Mapping[str, Any], *, source: str = "config",
                        base: Optional[SweepConfig] = None) -> SweepConfig:
    """A :class:`SweepConfig` with the keys of ``data`` set over ``base`` (default: defaults).

    Values are normalised (``"1,8"`` → ``[1, 8]``) and type-checked here; checks that need the
    model, the data or the GPU happen in :func:`prepare`.

    Raises:
        ConfigError: an unknown key (with a did-you-mean) or a value of the wrong type/range.
    """
    cfg = dataclasses.replace(base) if base is not None else SweepConfig()
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in _FIELDS:
            raise ConfigError(f"{source}: unknown setting {str(raw_key)!r}{did_you_mean(key, _FIELDS)}; "
                              f"settings: {', '.join(_FIELDS)}")
        setattr(cfg, key, _normalise(key, value, source))
    return cfg


def _where(source: str, key: str) -> str:
    return f"{source}: {key}"


def _split(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _to_int(v: Any, where: str, lo: Optional[int] = None) -> int:
    if isinstance(v, bool):
        raise ConfigError(f"{where}: expected an integer, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected an integer, got {v!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise ConfigError(f"{where}: expected an integer, got {v!r}")
    i = int(f)
    if lo is not None and i < lo:
        raise ConfigError(f"{where}: must be >= {lo}, got {i}")
    return i


def _to_float(v: Any, where: str, lo: Optional[float] = None) -> float:
    if isinstance(v, bool):
        raise ConfigError(f"{where}: expected a number, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {v!r}") from None
    if not math.isfinite(f) or (lo is not None and f < lo):
        raise ConfigError(f"{where}: expected a number >= {lo}, got {v!r}")
    return f


def _to_bool(v: Any, where: str) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{where}: expected true or false, got {v!r}")


def _choice(v: Any, where: str, choices: Sequence[str]) -> str:
    s = str(v).strip().lower()
    if s not in choices:
        raise ConfigError(f"{where}: expected one of {', '.join(choices)}, got {v!r}{did_you_mean(s, choices)}")
    return s


def parse_clock_spec(value: Any, where: str = "clocks") -> Any:
    """Normalise a clock spec: None (as found), ``"all"``, ``{"min":, "max":, "step":}`` or a
    list of ints (MHz). Syntax only; :func:`resolve_clocks` checks it against a GPU.

    Accepted: ``1980,1500,1200``; ``[1980, 1500]``; ``1500``; ``all``; ``1200:1980`` (every
    supported clock in the range); ``1200:1980:60`` (every 60 MHz from 1200 up to 1980).
    ``none``/``as-found``/empty = None.

    Raises:
        ConfigError: anything else, naming the accepted forms.
    """
    forms = "use e.g. 1980,1500,1200 or all or 1200:1980 or 1200:1980:60"
    if value is None:
        return None
    if isinstance(value, dict):
        value = f"{value.get('min')}:{value.get('max')}" + (f":{value['step']}" if value.get("step") else "")
    if isinstance(value, str):
        s = value.strip().lower()
        if s in ("", "none", "as-found", "as_found", "current"):
            return None
        if s == "all":
            return "all"
        if ":" in s:
            parts = s.split(":")
            if len(parts) not in (2, 3):
                raise ConfigError(f"{where}: {value!r} is not MIN:MAX or MIN:MAX:STEP; {forms}")
            lo, hi = (_to_int(p, f"{where} ({value!r})", 1) for p in parts[:2])
            step = _to_int(parts[2], f"{where} ({value!r}) step", 1) if len(parts) == 3 else None
            if lo > hi:
                raise ConfigError(f"{where}: range {value!r} has MIN > MAX")
            return {"min": lo, "max": hi, "step": step}
    items = _split(value)
    if not items:
        return None
    out = []
    for it in items:
        try:
            out.append(_to_int(it, where, 1))
        except ConfigError:
            raise ConfigError(f"{where}: {it!r} is not a clock in MHz; {forms}") from None
    return list(dict.fromkeys(out))  # keep order, drop duplicates


def _normalise(key: str, value: Any, source: str) -> Any:
    where = _where(source, key)
    if key == "models":
        if value is None:
            return None
        items = [str(v).strip() for v in _split(value)]
        if not items or any(not v for v in items):
            raise ConfigError(f"{where}: give at least one model spec (hub id, directory or arch:NAME)")
        return list(dict.fromkeys(items))
    if key == "tasks":
        items = []
        if isinstance(value, str):
            # commas separate tasks, but also a task's options: NAME:k=v,k=v. A piece with '='
            # and no ':' continues the previous task's option list.
            for piece in [p.strip() for p in value.split(",") if p.strip()]:
                if items and "=" in piece and ":" not in piece.split("=", 1)[0] and isinstance(items[-1], str) \
                        and ":" in items[-1]:
                    items[-1] += "," + piece
                else:
                    items.append(piece)
        else:
            items = _split(value)
        if not items:
            raise ConfigError(f"{where}: give at least one task")
        for it in items:
            if not isinstance(it, (str, dict)):
                raise ConfigError(f"{where}: a task is a name/spec string or a table, got {it!r}")
        return items
    if key in ("clocks", "mem_clocks"):
        return parse_clock_spec(value, where)
    if key == "power_limits":
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "as-found")):
            return None
        out = [_to_float(v, where, 1.0) for v in _split(value)]
        return list(dict.fromkeys(out)) or None
    if key == "batch_sizes":
        out = [_to_int(v, where, 1) for v in _split(value)]
        if not out:
            raise ConfigError(f"{where}: give at least one batch size")
        return list(dict.fromkeys(out))
    if key in ("repeats", "samples", "max_new_tokens"):
        return _to_int(value, where, 1)
    if key == "cb_cache_tokens":
        return None if value is None else _to_int(value, where, 1)
    if key in ("warmup", "seed", "warmup_requests", "cooldown_requests"):
        return _to_int(value, where, 0)
    if key in ("temperature",):
        v = _to_float(value, where, 0.0)
        if v <= 0:
            raise ConfigError(f"{where}: must be > 0")
        return v
    if key == "top_p":
        v = _to_float(value, where, 0.0)
        if not 0 < v <= 1:
            raise ConfigError(f"{where}: must be in (0, 1]")
        return v
    if key in ("idle_s", "settle_tolerance_mhz", "warmup_s", "cooldown_s"):
        return _to_float(value, where, 0.0)
    if key in ("request_timeout_s", "prefill_weight"):
        v = _to_float(value, where, 0.0)
        if v <= 0:
            raise ConfigError(f"{where}: must be > 0")
        return v
    if key in ("gpus", "gpus_per_model", "ray"):
        return _parallel_setting(key, value, where)
    if key in ("engine", "endpoint", "endpoint_model", "arrival_trace", "arrival_rate", "concurrency",
               "endpoint_api"):
        return _served_setting(key, value, where)
    if key in ("fixed_output_length", "allow_clock_changes", "stop_sequences", "apply_chat_template"):
        return _to_bool(value, where)
    if key == "model_args":
        try:
            return parse_model_args(value)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    if key == "dtype":
        return _choice(value, where, DTYPES)
    if key == "decoding":
        return _choice(value, where, ("greedy", "sampled"))
    if key == "ner":
        return _choice(value, where, NER_MODES)
    if key == "on_busy_gpu":
        return _choice(value, where, ON_BUSY)
    if key == "out":
        if value is None:
            return None
        s = str(value).strip()
        if not s:
            raise ConfigError(f"{where}: empty path")
        return s
    if key == "device":
        s = str(value).strip().lower()
        if s in ("auto", "cpu", "cuda") or s.startswith("cuda:") or s.isdigit():
            return f"cuda:{s}" if s.isdigit() else s
        raise ConfigError(f"{where}: expected auto, cpu, cuda or cuda:N, got {value!r}")
    if key == "gpu":
        if value is None:
            return "none"
        s = str(value).strip().lower()
        if s in ("auto", "none"):
            return s
        return _to_int(value, where, 0)
    raise AssertionError(key)  # pragma: no cover - _FIELDS and _normalise must agree


def _parallel_setting(key: str, value: Any, where: str) -> Any:
    """``gpus`` (None, ``"all"`` or CUDA indices), ``gpus_per_model`` (>= 1) and ``ray`` (None or
    an address: auto, local, ray://HOST:PORT, HOST:PORT)."""
    if key == "gpus_per_model":
        return _to_int(value, where, 1)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if key == "ray":
        s = str(value).strip()
        if s.lower() in ("auto", "local"):
            return s.lower()
        if s.startswith("ray://") or (":" in s and s.rsplit(":", 1)[1].isdigit()):
            return s
        raise ConfigError(f"{where}: expected auto, local, ray://HOST:PORT or HOST:PORT, got {value!r}")
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    out = [_to_int(v, where, 0) for v in _split(value)]
    if not out:
        raise ConfigError(f"{where}: give GPU indices, e.g. 0,1,2,3, or all")
    return list(dict.fromkeys(out))


def _served_setting(key: str, value: Any, where: str) -> Any:
    """The served-traffic settings (cross-field checks, e.g. one kind of load, are
    :func:`llm_dvfs.sweep.served.check_config`'s)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        if key == "endpoint_api":
            raise ConfigError(f"{where}: expected one of {', '.join(ENDPOINT_APIS)}")
        return None
    if key == "engine":
        return _choice(value, where, ENGINES)
    if key == "endpoint_api":
        return _choice(value, where, ENDPOINT_APIS)
    if key == "endpoint":
        from llm_dvfs.workload.endpoint import parse_endpoint_url
        try:
            parse_endpoint_url(str(value))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        return str(value).strip()
    if key in ("endpoint_model", "arrival_trace"):
        return str(value).strip()
    if key == "arrival_rate":
        out = [_to_float(v, where, 0.0) for v in _split(value)]
        if not out or any(v <= 0 for v in out):
            raise ConfigError(f"{where}: arrival rates must be > 0 requests/s, e.g. 1,2,4")
        return list(dict.fromkeys(out))
    out_c = [_to_int(v, where, 1) for v in _split(value)]  # concurrency
    if not out_c:
        raise ConfigError(f"{where}: give at least one concurrency, e.g. 1,4,16")
    return list(dict.fromkeys(out_c))


def load_config(path: Optional[str | os.PathLike[str]] = None, overrides: Optional[Mapping[str, Any]] = None
                ) -> SweepConfig:
    """Defaults, then the file at ``path`` (if any), then ``overrides`` (e.g. CLI flags)."""
    cfg = SweepConfig()
    if path is not None:
        cfg = config_from_mapping(load_config_file(path), source=str(path), base=cfg)
    if overrides:
        cfg = config_from_mapping(overrides, source="command line", base=cfg)
    return cfg


#: Settings that may be given again when resuming (they do not change the grid; an endpoint that
#: came back on another port is the same server; a run may continue on other GPUs of the same
#: model, or on a cluster).
RESUME_OVERRIDABLE = ("allow_clock_changes", "on_busy_gpu", "endpoint", "gpus", "ray")


def resume_config(run_dir: str | os.PathLike[str], overrides: Optional[Mapping[str, Any]] = None) -> SweepConfig:
    """The config of the run in ``run_dir`` (from its manifest), for ``--resume``.

    Only :data:`RESUME_OVERRIDABLE` settings may be passed in ``overrides``; a run that changed
    clocks needs ``allow_clock_changes`` again (the opt-in is never stored).

    Raises:
        ConfigError: not a run directory, an override that would change the grid, or a missing
            opt-in.
    """
    rd = RunDir(Path(run_dir).expanduser())
    if not rd.has_manifest():
        raise ConfigError(rd.not_a_run_dir())
    manifest = rd.read_manifest()
    if manifest.get("tool") != "llm_dvfs.run" or "config" not in manifest:
        raise ConfigError(f"--resume {str(run_dir)!r}: manifest.json is not from llm_dvfs.run")
    stored = {k: v for k, v in manifest["config"].items() if k in _FIELDS}
    if manifest["config"].get("resolved_models"):
        stored["models"] = manifest["config"]["resolved_models"]
    stored["allow_clock_changes"] = False
    stored["out"] = str(rd.path)
    cfg = config_from_mapping(stored, source=f"{rd.manifest_path}")
    extra = {k: v for k, v in (overrides or {}).items() if k.replace("-", "_") not in RESUME_OVERRIDABLE}
    if extra:
        raise ConfigError(f"--resume takes the grid from {rd.manifest_path}; these settings cannot be changed "
                          f"when resuming: {', '.join(sorted(extra))} (only {', '.join(RESUME_OVERRIDABLE)} "
                          "and --quiet/--verbose may be given)")
    cfg = config_from_mapping(dict(overrides or {}), source="command line", base=cfg)
    if manifest.get("mode") == "observe" and cfg.allow_clock_changes:
        # the cells were planned without clock changes; changing them now would change the grid
        log.warning("the run in %s is in observe mode; --allow-clock-changes is ignored when resuming it", run_dir)
        cfg.allow_clock_changes = False
    if manifest.get("mode") == "sweep" and not cfg.allow_clock_changes:
        from llm_dvfs.control.clocks import clock_changes_allowed
        if not clock_changes_allowed(False):
            raise ConfigError(f"the run in {str(run_dir)!r} changes clocks ({len(manifest['config'].get('clock_points', []))} "
                              "clock points); pass --allow-clock-changes again to resume it")
    return cfg


# the device setting → a torch device (here because embedded_default needs it; prepare uses it too)
def resolve_device(value: str) -> str:
    """The torch device of a ``device`` setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``).

    Raises:
        ConfigError: CUDA is requested but not available, or the ordinal is not visible.
    """
    import torch

    if value == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if value == "cpu":
        return "cpu"
    idx = 0 if value == "cuda" else _to_int(value.split(":", 1)[1], "device", 0)
    if not torch.cuda.is_available():
        raise ConfigError(f"device {value!r}: CUDA is not available to torch (CPU-only torch build "
                          "or no GPU visible); use --device cpu")
    if idx >= torch.cuda.device_count():
        raise ConfigError(f"device {value!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return f"cuda:{idx}"


__all__ = ["SweepConfig", "FIELD_HELP", "ON_BUSY", "ENGINES", "ENDPOINT_APIS", "NER_MODES", "DTYPES", "EMBEDDED_DEFAULT_GPU",
           "EMBEDDED_DEFAULT_CPU", "DEFAULT_GPU_MODEL", "DEFAULT_CPU_MODEL", "embedded_default", "did_you_mean",
           "load_config_file", "config_from_mapping", "parse_clock_spec", "load_config", "RESUME_OVERRIDABLE",
           "resume_config", "resolve_device"]
