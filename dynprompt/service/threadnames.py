"""Names of the server's threads as the operating system shows them (`top -H`, `ps -L`,
py-spy, `/proc/<pid>/task/*/comm`).

Python's thread names stay inside Python: to the kernel every thread of the server is
"python", so nobody can tell from outside whether the CPU goes to the event loop, to
tokenising or to the model. Each thread that matters names itself once, and a new thread
inherits the name of the thread that starts it (torch's intra-op threads are the compute
thread's, the Rust tokenizer's pool is `TOKENIZE`'s). `dynprompt bench overhead` reads
these names to say where the request path's CPU goes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

LOOP = "dp-loop"  # an HTTP process's event loop (with --workers 1, the core's too)
CORE = "dp-core"  # the engine core's socket thread (--workers N)
PREPARE = "dp-prepare"  # a backbone worker's tokenising, batching and copying thread
TOKENIZE = "dp-tokenize"  # the fast tokenizer's thread pool (Rust)
COMPUTE = "dp-compute"  # a backbone worker's model thread (and torch's intra-op threads)
POLL = "dp-poll"  # the model repository watcher
SUPERVISE = "dp-supervise"  # the parent of --workers N
ROLES = (LOOP, CORE, PREPARE, TOKENIZE, COMPUTE, POLL, SUPERVISE)

_PR_SET_NAME = 15  # prctl(2); the kernel keeps at most 15 bytes
_prctl = None
if sys.platform.startswith("linux"):
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    _prctl = getattr(_libc, "prctl", None)


def name_this_thread(name: str) -> None:
    """Give the calling thread `name` in the kernel (Linux; elsewhere nothing happens)."""
    if _prctl is not None:
        _prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def this_thread_name() -> str:
    """The calling thread's name in the kernel ("" where it cannot be read)."""
    try:
        with open("/proc/thread-self/comm", encoding="utf-8") as file:
            return file.read().strip()
    except OSError:
        return ""
