"""``--model-args``: extra keyword arguments for ``from_pretrained``, written as lm-eval writes them.

``parse_model_args("revision=abc123,attn_implementation=sdpa,load_in_8bit=true")`` gives
``{"revision": "abc123", "attn_implementation": "sdpa", "load_in_8bit": True}``. As in
lm-evaluation-harness' ``simple_parse_args_string``, pairs are separated by commas and values
are typed: ``true``/``false`` (any case) become booleans, ``none``/``null`` None, integers and
floats numbers, anything else stays a string. Unlike lm-eval, a value may be a JSON object or
list, whose commas do not split pairs, so a quantisation config fits on the command line:
``quantization_config={"load_in_4bit": true, "bnb_4bit_compute_dtype": "bfloat16"}``. Quotes
(``'...'`` or ``"..."``) keep a string value as it is (``name="1e10"`` stays a string);
revisions, attention implementations, tokenizers and dtypes are always strings
(:data:`STRING_KEYS`: revision ``0123`` must not become the number 123).

:func:`split_model_args` separates the keys that :func:`llm_dvfs.workload.models.load_model`
handles itself (revision, tokenizer, dtype, device map, ...) from those passed through.
No transformers import here: the sweep's config validates model args before anything loads.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from llm_dvfs.errors import ConfigError

#: keys load_model takes as its own arguments (they also steer the tokenizer or the device)
OWN_KEYS = ("revision", "trust_remote_code", "attn_implementation", "device_map", "tokenizer",
            "dtype", "torch_dtype")
#: the only keys an ``arch:`` model (built from a config with random weights) can use: the rest
#: (quantisation, revisions, remote code) need a checkpoint to load
ARCH_KEYS = ("attn_implementation", "tokenizer", "dtype", "torch_dtype")
#: values kept as strings whatever they look like: a revision "0123" or "2024" is a name, not a
#: number
STRING_KEYS = ("revision", "attn_implementation", "tokenizer", "dtype", "torch_dtype", "subfolder",
               "variant", "cache_dir", "token")


def _split_pairs(text: str) -> list[str]:
    """Split on commas outside brackets and quotes. A quote opens only at the start of a value
    or inside brackets, so an apostrophe in a plain value (``name=it's``) is just a character."""
    parts: list[str] = []
    buf: list[str] = []
    depth, quote = 0, ""
    for ch in text:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'" and (depth > 0 or "".join(buf).rstrip().endswith("=")):
            quote = ch
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
    if quote or depth:
        raise ConfigError(f"model_args {text!r}: unbalanced {'quote' if quote else 'brackets'}")
    parts.append("".join(buf))
    return parts


def _typed(key: str, raw: str) -> Any:
    v = raw.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
        return v[1:-1]
    if v[:1] in "{[":
        try:
            return json.loads(v)
        except json.JSONDecodeError as e:
            raise ConfigError(f"model_args: {key}={v!r} is not valid JSON ({e})") from None
    if key in STRING_KEYS:
        return v
    low = v.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def parse_model_args(value: "str | Mapping[str, Any] | None") -> dict[str, Any]:
    """``key=value,key=value`` (or a mapping, e.g. a config-file table) as a dict.

    Raises:
        ConfigError: a pair without ``=``, an empty key, a repeated key, invalid JSON in a
            ``{...}``/``[...]`` value, unbalanced quotes or brackets, or a mapping with
            non-string keys.
    """
    if value is None:
        return {}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not k.strip():
                raise ConfigError(f"model_args: keys must be non-empty strings, got {k!r}")
            out[k.strip()] = v
        return out
    text = str(value).strip()
    out: dict[str, Any] = {}
    if not text:
        return out
    for part in _split_pairs(text):
        if not part.strip():
            continue
        key, eq, raw = part.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"model_args {text!r}: {part.strip()!r} is not key=value "
                              "(e.g. revision=main,attn_implementation=sdpa)")
        if key in out:
            raise ConfigError(f"model_args {text!r}: {key!r} is given twice")
        out[key] = _typed(key, raw)
    return out


def split_model_args(model_args: Mapping[str, Any] | None, kind: str
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(load_model's own arguments, the rest for ``from_pretrained``) of ``model_args``.

    ``torch_dtype`` is taken as ``dtype`` (transformers renamed it in 4.56).

    Raises:
        ConfigError: for an ``arch:`` model (``kind == "arch"``), any key but
            :data:`ARCH_KEYS`: there is no checkpoint to pass it to.
    """
    own: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for k, v in (model_args or {}).items():
        if kind == "arch" and k not in ARCH_KEYS:
            raise ConfigError(f"model_args {k!r} needs a pretrained checkpoint; an arch: model is "
                              f"built from its configuration with random weights (it accepts "
                              f"{', '.join(ARCH_KEYS[:3])})")
        if k in OWN_KEYS:
            own["dtype" if k == "torch_dtype" else k] = v
        else:
            rest[k] = v
    return own, rest


__all__ = ["parse_model_args", "split_model_args", "OWN_KEYS", "ARCH_KEYS", "STRING_KEYS"]
