"""Can the Hugging Face hub be reached? One quick probe, so an offline machine never waits on retries.

Without network the hub client retries each request with back-off (about 25 s per file, and a
model reads several: config, weights index, tokenizer and image-processor files) before it falls
back to the local cache or fails; streamed datasets fail the same way, late. Compute nodes of
many clusters have no network. `hub_reachable` opens one TCP connection to the endpoint
(``HF_ENDPOINT``, default huggingface.co) with a short timeout, once per process. When it fails,
hub ids of models are read from the local Hugging Face cache only (`hub_kwargs`:
``local_files_only``; ``HF_HOME`` / ``HF_HUB_CACHE``), and a hub dataset fails at once, by name.

Not probed (the network is tried as before): with an HTTP(S) proxy in the environment (the
proxy, not a direct connection, decides), or with ``REMATCH_HUB_PROBE=0``. ``HF_HUB_OFFLINE=1``
means offline without a probe.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from urllib.parse import urlparse

log = logging.getLogger("rematch_pl.hub")

PROBE_ENV = "REMATCH_HUB_PROBE"
PROXY_ENVS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
TIMEOUT_S = 3.0


def endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


@functools.cache
def hub_reachable() -> bool:
    """False when the hub is known to be out of reach (HF_HUB_OFFLINE, or no TCP connection to the
    endpoint within `TIMEOUT_S`); True otherwise, including when it was not probed."""
    if _offline_env():
        return False
    if os.environ.get(PROBE_ENV, "1").strip() == "0" or any(os.environ.get(k) for k in PROXY_ENVS):
        return True
    url = urlparse(endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=TIMEOUT_S).close()
        return True
    except OSError as e:
        first = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"  # one line per job, not per rank
        (log.warning if first else log.debug)("the Hugging Face hub (%s) cannot be reached (%s): hub ids are read from the local cache "
                    "only; set HF_HUB_OFFLINE=1 to skip this check, or %s=0 if the hub is reachable by a route "
                    "it does not see", endpoint(), e, PROBE_ENV)
        return False


def looks_local(path: str) -> bool:
    """A folder, or a path written as one (absolute, relative with a dot, or under ~)."""
    return os.path.isdir(os.path.expanduser(path)) or path.startswith(("/", ".", "~"))


def hub_kwargs(path: str, revision: str | None = None) -> dict:
    """`from_pretrained` keyword arguments for `path`: its revision, and ``local_files_only`` for a
    hub id while the hub cannot be reached (the cached files load at once, without retries)."""
    kw = {"revision": revision} if revision else {}
    if not looks_local(path) and not hub_reachable():
        kw["local_files_only"] = True
    return kw


def model_kwargs(path: str, revision: str | None = None) -> dict:
    """`hub_kwargs` for a model's `from_pretrained`: its look-up of a PEFT adapter in the repo does
    not inherit ``local_files_only`` (transformers 5.x), so it is passed there too."""
    kw = hub_kwargs(path, revision)
    if kw.get("local_files_only"):
        kw["adapter_kwargs"] = {"local_files_only": True}
    return kw


def unreachable_note(path: str) -> str | None:
    """Why a hub id failed to load when the probe found no hub (None when it did, or for a folder)."""
    if looks_local(path) or hub_reachable():
        return None
    return (f"not in the local Hugging Face cache ({cache_dir()}), and the hub ({endpoint()}) cannot be reached "
            f"from this machine")


def cache_dir() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
