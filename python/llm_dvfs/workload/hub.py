"""Is the Hugging Face hub reachable? One short check per process, so an offline machine fails fast.

Without it, ``from_pretrained`` of a hub id that is not cached retries its HEAD request five
times with back-off (~25-30 s of "Retrying in 8s" lines) before it gives up. :func:`ensure_hub`
decides once, in at most :data:`CONNECT_TIMEOUT_S`:

* ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``): offline, no network attempt;
* else a TCP connection to the hub's host (``HF_ENDPOINT``, default huggingface.co) on 443,
  name resolution included, within the timeout; when it fails the process switches
  huggingface_hub to offline mode (cached models still load; nothing retries).

Then a model that is not in the cache gets one :class:`~llm_dvfs.errors.DataNotFound` saying how
to get it. The check is skipped for local directories and ``arch:`` models (they need no hub).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Optional
from urllib.parse import urlparse

from llm_dvfs.errors import DataNotFound

log = logging.getLogger("llm_dvfs.workload.hub")

#: Time allowed to resolve and connect to the hub (s).
CONNECT_TIMEOUT_S = 3.0

_state: dict[str, Optional[str]] = {}  # "offline_reason" -> why offline, or None when online
_lock = threading.Lock()


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _probe(host: str, port: int, timeout_s: float) -> Optional[str]:
    """None when ``host:port`` accepts a TCP connection within ``timeout_s``, else why not.
    getaddrinfo has no timeout of its own: the probe runs in a daemon thread that is abandoned."""
    result: list[Optional[str]] = []

    def run() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e}")

    t = threading.Thread(target=run, name="llm_dvfs-hub-probe", daemon=True)
    t.start()
    t.join(timeout_s)
    return result[0] if result else f"no answer from {host}:{port} within {timeout_s:g} s"


def _go_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:  # huggingface_hub reads the variable at import: tell an imported one too
        import huggingface_hub.constants as c
        c.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        pass


def offline_reason(timeout_s: float = CONNECT_TIMEOUT_S) -> Optional[str]:
    """Why the hub is not usable in this process (None: it is reachable). Checked once, then
    remembered; switches huggingface_hub to offline mode when it is not. Never raises."""
    if _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE"):
        return "HF_HUB_OFFLINE is set"  # read at each call: a caller may set it at any time
    with _lock:
        if "offline_reason" in _state:  # the probe's answer, once per process
            return _state["offline_reason"]
        url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
        port = url.port or (80 if url.scheme == "http" else 443)
        why = _probe(url.hostname or "huggingface.co", port, timeout_s)
        if why is not None:
            why = f"the hub ({url.hostname}) is not reachable: {why}"
            log.info("%s; using the local cache only (offline mode)", why)
            _go_offline()
        _state["offline_reason"] = why
        return why


def is_cached(repo_id: str, revision: Optional[str] = None, cache_dir: Optional[str] = None) -> bool:
    """Whether the hub cache holds ``repo_id``'s config.json at ``revision``. Never raises."""
    try:
        from huggingface_hub import try_to_load_from_cache
        got = try_to_load_from_cache(repo_id, "config.json", revision=revision, cache_dir=cache_dir)
    except Exception:  # a malformed id (HFValidationError), an unreadable cache: not cached
        return False
    return isinstance(got, str)


def ensure_hub(repo_id: str, revision: Optional[str] = None, cache_dir: Optional[str] = None,
               how_to_get: Optional[str] = None) -> None:
    """Fail fast when ``repo_id`` can only come from a hub that this process cannot reach.
    ``how_to_get`` replaces the message's default advice (what to download, what else to use).

    Raises:
        DataNotFound: offline (or unreachable) and not in the cache; the message says how to
            get the model or what to use instead.
    """
    why = offline_reason()
    if why is None or is_cached(repo_id, revision, cache_dir):
        return
    rev = f" at revision {revision!r}" if revision else ""
    advice = how_to_get or (
        f"Download it on a machine with internet (`hf download {repo_id}`; gated models also need an accepted "
        "licence and HF_TOKEN) and copy the cache (~/.cache/huggingface), or pass a local directory, or use an "
        "arch: model with random weights (python -c 'import llm_dvfs.workload.models as m; print(m.list_arch())')")
    raise DataNotFound(f"model {repo_id!r}{rev} is not in the Hugging Face cache and {why}. "
                       f"{advice[:1].upper()}{advice[1:]}")


__all__ = ["CONNECT_TIMEOUT_S", "offline_reason", "is_cached", "ensure_hub"]
