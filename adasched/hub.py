"""Hub names (models, tokenizers, datasets) resolved from the local cache first, and fast when the hub is out of reach.

Left to themselves the hub clients retry an unreachable hub for half a minute, warning at every try. Here a
name is looked up in the cache without any network; only if it is missing there is the hub contacted, once,
after a short check that it can be reached at all.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlparse

from huggingface_hub import constants

from adasched.errors import DataUnavailableError, first_line

T = TypeVar("T")
REACH_TIMEOUT_S = 3.0


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, read now: huggingface_hub reads it once at import, possibly before a caller sets it."""
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def hub_reachable() -> bool:
    """False when the hub is switched off (HF_HUB_OFFLINE) or its endpoint does not answer within a few seconds."""
    if hub_offline():
        return False
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=REACH_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def cached_or_downloaded(load: Callable[..., T], name: str, what: str, how: str = "connect once to cache it, or pass a local path") -> T:
    """``load(name, local_files_only=True)``, else ``load(name)`` once if the hub answers, else a one-line error
    naming ``what`` failed and ``how`` to get it."""
    try:
        return load(name, local_files_only=True)
    except OSError:
        pass
    if not hub_reachable():
        raise DataUnavailableError(
            f"{what} {name!r} is neither a local folder nor in the hub cache, and the hub cannot be reached; {how}"
        )
    try:
        return load(name)
    except OSError as error:
        raise DataUnavailableError(f"{what} {name!r} could not be loaded from the hub ({first_line(error)}); {how}") from error
