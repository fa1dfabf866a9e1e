"""Models for the sweep: Hugging Face checkpoints, or shipped architectures with random weights.

A *model spec* is one of

* a Hugging Face hub id (``"meta-llama/Llama-3.2-1B"``) — pretrained weights, downloaded or cached;
* a local directory holding ``config.json`` and weights — pretrained weights;
* ``"arch:NAME"`` — an architecture shipped in ``llm_dvfs/configs/arch/NAME.json`` (copied from the
  public ``config.json`` of the real model), instantiated with **random** weights. Compute, memory
  traffic and therefore energy and latency per token match the real model; output text and quality
  metrics are meaningless (``LoadedModel.weights == "random"``).

``arch:`` models get a tokenizer that the package builds offline (a byte-level BPE trained on the
English corpus in ``llm_dvfs/configs/text``, cached under ``$LLM_DVFS_CACHE/tokenizers``), so token
counts for English prompts are realistic, though not identical to the real model's tokenizer.
Pass ``tokenizer=`` (a local directory or hub id) to use a real one.

Importing this module does not import torch or transformers; :func:`load_model` does.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

from llm_dvfs.atomic import atomic_write_with
from llm_dvfs.errors import ConfigError, DataNotFound
from llm_dvfs.workload.configs import textgen
from llm_dvfs.workload.hub import ensure_hub
from llm_dvfs.workload.model_args import split_model_args

ARCH_PREFIX = "arch:"
# Bump when the corpus, the trainer settings or the special tokens change: it keys the cache.
OFFLINE_TOKENIZER_VERSION = 1
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

_DTYPES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}


# --------------------------------------------------------------------------------------------
# shipped architectures
# --------------------------------------------------------------------------------------------
def _arch_dir():
    from importlib import resources
    return resources.files("llm_dvfs.workload.configs").joinpath("arch")


def list_arch() -> list[str]:
    """Names usable as ``arch:NAME``, sorted (e.g. ``["falcon-7b", ..., "tiny"]``)."""
    return sorted(p.name[:-5] for p in _arch_dir().iterdir() if p.name.endswith(".json"))


def _arch_doc(name: str) -> dict:
    known = list_arch()
    if name not in known:
        raise ConfigError(f"unknown architecture '{ARCH_PREFIX}{name}'; known: "
                          + ", ".join(ARCH_PREFIX + k for k in known))
    return textgen.load_json("arch", f"{name}.json")


def arch_info(name: str) -> dict[str, Any]:
    """What ``arch:NAME`` is: hub id of the real model, parameter count and the key shapes.

    Returns a dict with ``name, hub_id, expected_params, notes, layers, hidden, intermediate,
    heads, kv_heads, vocab, max_positions, rope_theta, activation`` (``None`` where the
    architecture has no such field, e.g. rope_theta for GPT-Neo). Raises ConfigError for unknown names.
    """
    doc = _arch_doc(name.removeprefix(ARCH_PREFIX))
    c = doc["config"]
    hidden = c["hidden_size"]
    heads = c.get("num_attention_heads", c.get("num_heads"))
    if c["model_type"] == "falcon":
        kv = 1 if c.get("multi_query") else c.get("num_kv_heads", heads)
    else:
        kv = c.get("num_key_value_heads", heads)
    inter = c.get("intermediate_size") or c.get("ffn_hidden_size") or 4 * hidden
    return {
        "name": doc["name"], "hub_id": doc["hub_id"], "expected_params": doc["expected_params"],
        "notes": doc["notes"],
        "layers": c.get("num_hidden_layers", c.get("num_layers")), "hidden": hidden,
        "intermediate": inter, "heads": heads, "kv_heads": kv, "vocab": c["vocab_size"],
        "max_positions": c.get("max_position_embeddings"), "rope_theta": c.get("rope_theta"),
        "activation": c.get("hidden_act", c.get("activation_function", c.get("activation"))),
    }


def arch_config(name: str):
    """A fresh ``transformers`` config object for ``arch:NAME`` (ConfigError if unknown)."""
    doc = _arch_doc(name.removeprefix(ARCH_PREFIX))
    from transformers import AutoConfig
    c = dict(doc["config"])
    model_type = c.pop("model_type")
    return AutoConfig.for_model(model_type, **c)


# --------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec.

    Attributes:
        raw: the spec as given (recorded in results' ``model`` column).
        kind: ``"hub"`` | ``"local"`` | ``"arch"``.
        target: hub id, absolute directory path, or architecture name (without ``arch:``).
    """
    raw: str
    kind: Literal["hub", "local", "arch"]
    target: str

    @property
    def weights(self) -> Literal["pretrained", "random"]:
        return "random" if self.kind == "arch" else "pretrained"

    @classmethod
    def parse(cls, spec: "str | os.PathLike[str] | ModelSpec") -> "ModelSpec":
        """Classify ``spec``; cheap (no torch), validates ``arch:`` names and local paths.

        Raises:
            ConfigError: unknown ``arch:`` name, empty spec, or a bare architecture name such as
                ``llama-3.2-1b`` (ambiguous: say ``arch:llama-3.2-1b`` or give the hub id).
            DataNotFound: the spec is a filesystem path that does not exist.
        """
        if isinstance(spec, ModelSpec):
            return spec
        raw = os.fspath(spec).strip()
        if not raw:
            raise ConfigError("empty model spec; give a hub id, a local directory or arch:NAME "
                              f"(known: {', '.join(ARCH_PREFIX + k for k in list_arch())})")
        if raw.startswith(ARCH_PREFIX):
            name = raw[len(ARCH_PREFIX):]
            _arch_doc(name)  # raises ConfigError listing the known names
            return cls(raw, "arch", name)
        path = Path(raw).expanduser()
        if path.is_dir():
            return cls(raw, "local", str(path.resolve()))
        if raw.startswith(("/", "./", "../", "~")) or path.suffix in (".json", ".safetensors", ".bin"):
            raise DataNotFound(f"model directory {raw!r} does not exist (a local model is a directory "
                               "with config.json and weights, e.g. from `hf download ORG/NAME "
                               "--local-dir DIR`)")
        if raw in list_arch():
            info = arch_info(raw)
            hub = f" or the hub id {info['hub_id']!r} for pretrained weights" if info["hub_id"] else ""
            raise ConfigError(f"model {raw!r} is ambiguous: use {ARCH_PREFIX}{raw} for random weights{hub}")
        return cls(raw, "hub", raw)


# --------------------------------------------------------------------------------------------
# offline tokenizer
# --------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Root of llm_dvfs's on-disk cache: ``$LLM_DVFS_CACHE``, else ``$XDG_CACHE_HOME/llm_dvfs``,
    else ``~/.cache/llm_dvfs``."""
    env = os.environ.get("LLM_DVFS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "llm_dvfs"


def _corpus_digest(docs: list[str]) -> str:
    h = hashlib.sha256(f"v{OFFLINE_TOKENIZER_VERSION}".encode())
    for d in docs:
        h.update(d.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:12]


def offline_tokenizer_path() -> Path:
    """Where the offline tokenizer (its full, uncapped vocabulary) is or will be cached."""
    docs = textgen.tokenizer_corpus()
    return cache_dir() / "tokenizers" / f"bpe-en-{_corpus_digest(docs)}.json"


def _train_full_tokenizer(use_cache: bool):
    """The BPE trained to exhaustion on the corpus (every merge seen at least twice)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    docs = textgen.tokenizer_corpus()
    path = cache_dir() / "tokenizers" / f"bpe-en-{_corpus_digest(docs)}.json"
    if use_cache and path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:  # a corrupt cache file is rebuilt below
            pass
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1 << 20, min_frequency=2, show_progress=False,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # atomic: concurrent builders never see half a file
            atomic_write_with(path, tok.save)
        except OSError:
            pass  # read-only cache: still usable, just rebuilt next time
    return tok


def _truncate_bpe(tok, vocab_size: int):
    """The BPE with only its first ``vocab_size`` ids. Identical to training with that
    ``vocab_size`` (the trainer assigns ids in merge order), and milliseconds instead of a second."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < vocab_size}
    merges = []
    for m in spec["model"]["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        if a + b in vocab:
            merges.append(m)
    spec["model"]["vocab"], spec["model"]["merges"] = vocab, merges
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < vocab_size]
    return Tokenizer.from_str(json.dumps(spec))


def build_offline_tokenizer(vocab_size: int, *, use_cache: bool = True):
    """A byte-level BPE tokenizer for English, trained on the shipped corpus (offline).

    The vocabulary has at most ``vocab_size`` entries (including the special tokens
    ``<|endoftext|>``, used as EOS and BOS, and ``<|pad|>``), fewer when the corpus supports
    fewer merges (pairs must occur at least twice; about 18k entries). Any byte string is
    encodable. No BOS token is prepended. The full tokenizer is trained once (about a second) and
    cached at :func:`offline_tokenizer_path`; smaller vocabularies are cut from it.

    Token counts for English are realistic but not identical to any real model's tokenizer: about
    1.2 tokens per word on the synthetic task's text, 1.2–1.8 on other English (real 32k–128k
    vocabularies: about 1.2–1.5), more for rare words, names and non-English text.

    Returns:
        ``transformers.PreTrainedTokenizerFast`` with eos/bos/pad set, ``padding_side="left"``.

    Raises:
        ConfigError: ``vocab_size`` < 300 (the 256 byte symbols and special tokens need room).
    """
    if vocab_size < 300:
        raise ConfigError(f"offline tokenizer needs vocab_size >= 300, got {vocab_size}")
    from transformers import PreTrainedTokenizerFast

    tok = _train_full_tokenizer(use_cache)
    if vocab_size < tok.get_vocab_size():
        tok = _truncate_bpe(tok, int(vocab_size))
    # model_input_names: a causal LM takes no token_type_ids, which transformers < 5 would
    # otherwise return and generate() rejects
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                 pad_token=PAD_TOKEN, padding_side="left",
                                 model_input_names=["input_ids", "attention_mask"])
    hf.name_or_path = f"llm_dvfs-offline-bpe-{len(hf)}"
    return hf


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model ready for ``generate``.

    Attributes:
        model: the ``transformers`` causal LM, in eval mode.
        tokenizer: its tokenizer, ``padding_side="left"`` (for batched generation), with a pad token.
        spec: the parsed :class:`ModelSpec`.
        weights: ``"pretrained"`` | ``"random"``; quality metrics are meaningful only for pretrained.
        name: short name (architecture name, hub id, or directory name).
        dtype: parameter dtype as a string, e.g. ``"bfloat16"``.
        device: device of the input embeddings, e.g. ``"cuda:0"``, ``"cpu"``, ``"meta"``.
        tokenizer_source: ``"offline-bpe"`` or where the tokenizer was loaded from.
        n_params: number of parameters (tied weights counted once).
        revision: what pins the weights: for a hub model the commit hash its revision resolved
            to (see :func:`_resolved_commit`), else the revision asked for; None for local
            directories and ``arch:`` models, which have none.
        model_args: the extra ``from_pretrained`` arguments it was loaded with.
    """
    model: Any
    tokenizer: Any
    spec: ModelSpec
    weights: Literal["pretrained", "random"]
    name: str
    dtype: str
    device: str
    tokenizer_source: str = ""
    n_params: int = 0
    extra: dict = field(default_factory=dict)
    revision: Optional[str] = None
    model_args: dict = field(default_factory=dict)

    @property
    def quality_valid(self) -> bool:
        """False for random weights: the task metrics of their outputs mean nothing."""
        return self.weights == "pretrained"

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for a run manifest."""
        return {"model": self.spec.raw, "name": self.name, "kind": self.spec.kind,
                "weights": self.weights, "dtype": self.dtype, "device": self.device,
                "n_params": self.n_params, "tokenizer": self.tokenizer_source,
                "tokenizer_vocab": len(self.tokenizer), "revision": self.revision,
                "model_args": dict(self.model_args),
                "eos_token_id": getattr(getattr(self.model, "generation_config", None), "eos_token_id", None),
                **self.extra}


def _parse_dtype(dtype: Any) -> "str":
    import torch
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return "auto"
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32")
    return _DTYPES[key]


def _parse_device(device: Any) -> str:
    import torch
    if device is None:
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if isinstance(device, int):
        device = f"cuda:{device}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available "
                              "(torch build without CUDA, or no GPU visible)")
        idx = 0 if dev.index is None else dev.index
        if idx >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return f"cuda:{idx}"
    if dev.type not in ("cpu", "meta"):
        raise ConfigError(f"unsupported device {device!r}; use cpu, cuda:N or meta")
    return dev.type


def _hub_hint(target: str) -> str:
    return (f"download it once with internet (`hf download {target}`, or "
            f"`huggingface-cli download {target}`; gated models such as meta-llama/* need an "
            "accepted licence and HF_TOKEN), then run with HF_HUB_OFFLINE=1; or pass a local "
            "directory; or use an arch: model with random weights (known: "
            + ", ".join(ARCH_PREFIX + k for k in list_arch()) + ")")


#: from_pretrained arguments that locate files, so the tokenizer needs them as much as the model
_HUB_FILE_KWARGS = ("cache_dir", "token", "local_files_only", "force_download", "proxies")


def _load_tokenizer(source: str, revision: str | None, trust_remote_code: bool,
                    hub_kwargs: Optional[Mapping[str, Any]] = None):
    from transformers import AutoTokenizer
    more = {k: v for k, v in (hub_kwargs or {}).items() if k in _HUB_FILE_KWARGS}
    if not os.path.isdir(source):  # a hub id: fail fast offline (no retry storm)
        ensure_hub(source, revision, more.get("cache_dir"), how_to_get=_hub_hint(source))
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision,
                                            trust_remote_code=trust_remote_code, **more)
    except (OSError, ValueError) as e:
        raise DataNotFound(f"tokenizer {source!r} could not be loaded ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); " + _hub_hint(source)) from e
    if tok.pad_token is None:
        # decoder-only tokenizers often lack one; padding positions are masked anyway
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "left"
    return tok


def _count_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _merge_own_args(own: Mapping[str, Any], given: dict[str, Any], defaults: Mapping[str, Any]) -> None:
    """``model_args`` keys that are load_model's own arguments, into ``given`` (in place).

    Raises:
        ConfigError: the same argument given both ways with different values.
    """
    for k, v in own.items():
        if given[k] != defaults[k] and given[k] != v:
            raise ConfigError(f"{k} is given twice, as {given[k]!r} and in model_args as {v!r}")
        given[k] = v


def load_model(spec: "str | os.PathLike[str] | ModelSpec", dtype: Any = "auto", device: Any = None,
               device_map: Any = None, revision: str | None = None,
               trust_remote_code: bool = False, seed: int = 0,
               tokenizer: "str | os.PathLike[str] | None" = None,
               attn_implementation: str | None = None,
               model_args: Optional[Mapping[str, Any]] = None) -> LoadedModel:
    """Load (or, for ``arch:``, build) a causal LM and its tokenizer.

    Args:
        spec: hub id, local directory, or ``arch:NAME`` (see :func:`list_arch`).
        dtype: ``"auto"`` (the checkpoint's / architecture's dtype), ``"bfloat16"``, ``"float16"``,
            ``"float32"`` (aliases bf16, fp16, fp32) or a ``torch.dtype``.
        device: ``"cpu"``, ``"cuda:N"``, ``N`` or ``"meta"`` (shapes only, nothing allocated);
            ``None`` = ``cuda:0`` when available, else cpu. Ignored when ``device_map`` is given.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"``) for pretrained models; an
            ``arch:`` model accepts only a single device here.
        revision: hub revision (branch, tag or commit) of a pretrained model; the model and its
            tokenizer are loaded at it, and :attr:`LoadedModel.revision` records the commit it
            resolved to.
        trust_remote_code: allow model code from the hub (off by default; no shipped
            architecture needs it).
        seed: seeds the random weights of ``arch:`` models (same seed, same device and dtype →
            same weights); the global RNG state is left as it was.
        tokenizer: a directory or hub id to take the tokenizer from (default: the model's own; for
            ``arch:`` the offline BPE tokenizer).
        attn_implementation: e.g. ``"sdpa"``, ``"eager"``; None = transformers' default.
        model_args: more ``from_pretrained`` keyword arguments, as ``--model-args`` gives them
            (:func:`llm_dvfs.workload.model_args.parse_model_args`), e.g.
            ``{"quantization_config": {...}, "low_cpu_mem_usage": True}``. The keys ``revision``,
            ``trust_remote_code``, ``attn_implementation``, ``device_map``, ``tokenizer`` and
            ``dtype``/``torch_dtype`` set the arguments of the same name.

    The model's ``generation_config`` is kept as the checkpoint has it (several EOS ids for
    Llama-3 instruct models, for one); only a missing pad id is filled in from the tokenizer.
    An ``arch:`` model's special ids are the offline tokenizer's (the shipped configuration's
    belong to the real model's tokenizer).

    Raises:
        ConfigError: unknown ``arch:`` name, bad dtype/device, device_map for an ``arch:`` model,
            a tokenizer larger than the model's vocabulary, model_args an ``arch:`` model cannot
            use or that contradict an argument — all before anything heavy is loaded.
        DataNotFound: a hub model/tokenizer not cached and not downloadable, or a missing directory;
            the message says how to obtain it.
    """
    ms = ModelSpec.parse(spec)
    own, rest = split_model_args(model_args, ms.kind)
    args = {"dtype": dtype, "device_map": device_map, "revision": revision,
            "trust_remote_code": trust_remote_code, "tokenizer": tokenizer,
            "attn_implementation": attn_implementation}
    _merge_own_args(own, args, {"dtype": "auto", "device_map": None, "revision": None,
                                "trust_remote_code": False, "tokenizer": None,
                                "attn_implementation": None})
    torch_dtype = _parse_dtype(args["dtype"])
    revision = None if args["revision"] is None else str(args["revision"])
    if ms.kind == "arch":
        device_map = args["device_map"]
        if device_map is not None:
            if isinstance(device_map, (str, int)) and str(device_map) != "auto":
                device = device_map
            else:
                raise ConfigError("device_map is for pretrained checkpoints; an arch: model is built "
                                  "on one device (pass device='cuda:N')")
        lm = _build_arch(ms, torch_dtype, _parse_device(device), seed, args["tokenizer"],
                         revision, bool(args["trust_remote_code"]), args["attn_implementation"])
    else:
        lm = _load_pretrained(ms, torch_dtype, device, args["device_map"], revision,
                              bool(args["trust_remote_code"]), args["tokenizer"],
                              args["attn_implementation"], rest)
    lm.model_args = dict(model_args or {})
    return lm


def load_tokenizer(spec: "str | os.PathLike[str] | ModelSpec",
                   model_args: Optional[Mapping[str, Any]] = None):
    """The tokenizer :func:`load_model` would give ``spec`` with ``model_args``, without the
    weights (e.g. to check for a chat template before a sweep starts).

    Raises:
        ConfigError, DataNotFound: as :func:`load_model`.
    """
    ms = ModelSpec.parse(spec)
    own, rest = split_model_args(model_args, ms.kind)
    tok_src = own.get("tokenizer")
    trust = bool(own.get("trust_remote_code", False))
    if tok_src is not None:
        return _load_tokenizer(os.fspath(tok_src), None, trust, rest)
    if ms.kind == "arch":
        return build_offline_tokenizer(arch_config(ms.target).vocab_size)
    rev = own.get("revision")
    return _load_tokenizer(ms.target, None if rev is None else str(rev), trust, rest)


def _build_arch(ms: ModelSpec, torch_dtype: str, device: str, seed: int, tokenizer,
                revision, trust_remote_code, attn_implementation) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM

    config = arch_config(ms.target)
    if tokenizer is not None:
        # `revision` belongs to the model's hub id, not to a separately named tokenizer
        tok = _load_tokenizer(os.fspath(tokenizer), None, trust_remote_code)
        tok_source = os.fspath(tokenizer)
    else:
        tok = build_offline_tokenizer(config.vocab_size)
        tok_source = "offline-bpe"
    if len(tok) > config.vocab_size:
        raise ConfigError(f"tokenizer {tok_source!r} has {len(tok)} tokens but {ms.raw} has a "
                          f"vocabulary of {config.vocab_size}; ids would overflow the embedding")
    # the config's special ids belong to the real tokenizer; ours may number them differently
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tid = getattr(tok, attr)
        if tid is not None:
            setattr(config, attr, tid)
    if torch_dtype == "auto":
        torch_dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
                          or "float32").removeprefix("torch.")
    dt = getattr(torch, torch_dtype)
    kwargs = {"dtype": dt}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    # Build directly on the target device: parameters are allocated and initialised there (a 7B
    # bf16 model takes seconds on a GPU instead of minutes on the CPU). fork_rng keeps the
    # caller's RNG streams untouched while the seed fixes the weights.
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.eval().requires_grad_(False)  # inference only: no autograd bookkeeping
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        # built from the config, so there is no checkpoint generation_config to keep: its ids
        # are the offline tokenizer's, as the config's are
        gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = \
            tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    return LoadedModel(model=model, tokenizer=tok, spec=ms, weights="random", name=ms.target,
                       dtype=torch_dtype, device=device, tokenizer_source=tok_source,
                       n_params=_count_params(model),
                       extra={"hub_id_of_architecture": arch_info(ms.target)["hub_id"],
                              "seed": seed})


def _load_pretrained(ms: ModelSpec, torch_dtype: str, device, device_map, revision,
                     trust_remote_code, tokenizer, attn_implementation,
                     extra_kwargs: Mapping[str, Any]) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    move_to = None
    if device_map is None:
        dev = _parse_device(device)
        if dev == "meta":
            raise ConfigError("device='meta' is only for arch: models")
        if importlib.util.find_spec("accelerate") is not None:
            device_map = dev  # weights are loaded straight onto the device
        else:
            move_to = dev     # transformers needs accelerate for device_map; load, then move
    if ms.kind == "hub":
        ensure_hub(ms.target, revision, extra_kwargs.get("cache_dir"), how_to_get=_hub_hint(ms.target))
    tok_src = os.fspath(tokenizer) if tokenizer is not None else ms.target
    tok = _load_tokenizer(tok_src, revision if tokenizer is None else None, trust_remote_code,
                          extra_kwargs)
    kwargs: dict[str, Any] = {**extra_kwargs, "revision": revision, "dtype": torch_dtype,
                              "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(ms.target, **kwargs)
    except OSError as e:
        raise DataNotFound(f"model {ms.target!r} could not be loaded ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); " + _hub_hint(ms.target)) from e
    except ValueError as e:
        if "accelerate" in str(e):
            raise ConfigError(f"device_map={device_map!r} needs the accelerate package "
                              "(pip install accelerate), or pass device='cuda:N' instead") from e
        raise
    if move_to is not None:
        model.to(move_to)
    model.eval().requires_grad_(False)
    # the checkpoint's generation_config stays as it is (its EOS ids above all: Llama-3 instruct
    # models end a turn with <|eot_id|>, which the tokenizer's single eos_token is not); only a
    # missing pad id is filled in, which generate would otherwise warn about on every call
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    p = next(model.parameters())
    name = Path(ms.target).name if ms.kind == "local" else ms.target
    return LoadedModel(model=model, tokenizer=tok, spec=ms, weights="pretrained", name=name,
                       dtype=str(p.dtype).removeprefix("torch."),
                       device=str(model.get_input_embeddings().weight.device),
                       tokenizer_source=tok_src, n_params=_count_params(model),
                       extra={"revision_requested": revision},
                       # the commit the hub cache resolved pins the weights even when the
                       # request was a branch name; None for a local directory
                       revision=(_resolved_commit(ms.target, revision, model, extra_kwargs)
                                 if ms.kind == "hub" else None) or revision)


def _resolved_commit(repo_id: str, revision: Optional[str], model: Any,
                     hub_kwargs: Mapping[str, Any]) -> Optional[str]:
    """The commit hash a hub model was loaded at, or None when it cannot be told.

    transformers 4.x records it on the config (``_commit_hash``); 5.x resolves the revision
    internally and records nothing, so the hash is read from where the loaded config.json lies
    in the hub cache (``.../snapshots/<commit>/config.json``, the layout huggingface_hub
    guarantees), looked up at the same revision. Never raises.
    """
    h = getattr(getattr(model, "config", None), "_commit_hash", None)
    if isinstance(h, str) and h:
        return h
    try:
        from huggingface_hub import try_to_load_from_cache

        sub = hub_kwargs.get("subfolder")
        path = try_to_load_from_cache(repo_id, f"{sub}/config.json" if sub else "config.json",
                                      cache_dir=hub_kwargs.get("cache_dir"), revision=revision)
    except Exception:  # noqa: BLE001 - recording the revision must not fail a load
        return None
    if not isinstance(path, (str, os.PathLike)):
        return None  # not cached, or cached as missing
    m = re.search(r"/snapshots/([0-9a-f]{40})/", Path(path).as_posix())
    return m.group(1) if m else None


__all__ = ["ARCH_PREFIX", "ModelSpec", "LoadedModel", "load_model", "load_tokenizer", "list_arch", "arch_info",
           "arch_config", "build_offline_tokenizer", "offline_tokenizer_path", "cache_dir"]
