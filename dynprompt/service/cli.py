"""`dynprompt serve`: settings first, then the server (`server.py`).

Parsing imports neither uvicorn, FastAPI nor torch, so `--help` and every mistake in
the settings answer at once.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from dynprompt.service.config import SettingsError, settings_from
from dynprompt.service.logs import configure_logging

log = logging.getLogger("dynprompt.service")


def serve_main(argv: Sequence[str] | None = None) -> int:
    """Settings first, so that any mistake in them (an unknown `DYNPROMPT_*` variable, keys
    missing on a reachable host, a missing repository) is one line on stderr and exit 2,
    before a model loads or the port is bound."""
    from dynprompt.service.config import is_loopback

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = settings_from(args)
    except SettingsError as exc:
        print(f"dynprompt serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if any(a == "--api-key" or a.startswith("--api-key=") for a in args):
        log.warning(
            "API keys given with --api-key show in `ps` to every user of this machine; "
            "pass them in DYNPROMPT_API_KEY or a file (--api-key-file)"
        )
    if not settings.api_keys and not is_loopback(settings.host):
        log.warning(
            "no API key (--allow-unauthenticated): anyone who reaches %s:%d may classify "
            "and reload models", settings.host, settings.port,
        )  # fmt: skip
    workers = settings.resolved_workers()
    log.info(
        "starting dynprompt serve: repository %s, device %s, dtype %s, backend %s, "
        "%d HTTP process(es)",
        settings.repository, settings.resolved_device(), settings.dtype, settings.backend, workers,
        extra={"fields": {"settings": settings.public_dict()}},
    )  # fmt: skip
    from dynprompt.service.server import serve_single, supervise

    if workers == 1:
        return serve_single(settings)
    return supervise(settings, workers)
