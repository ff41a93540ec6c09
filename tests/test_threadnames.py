"""Thread names in the kernel: what `top -H`, py-spy and `bench overhead` see."""

from __future__ import annotations

import sys
import threading

import pytest

from dynprompt.service.threadnames import ROLES, name_this_thread, this_thread_name

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux prctl")


def test_a_thread_names_itself_and_its_children_inherit_the_name() -> None:
    seen: dict[str, str] = {}

    def child() -> None:
        seen["child"] = this_thread_name()

    def parent() -> None:
        name_this_thread("dp-test-parent-long")  # over 15 bytes: the kernel keeps 15
        seen["parent"] = this_thread_name()
        thread = threading.Thread(target=child)
        thread.start()
        thread.join()

    before = this_thread_name()
    thread = threading.Thread(target=parent)
    thread.start()
    thread.join()
    assert seen == {"parent": "dp-test-parent-", "child": "dp-test-parent-"}
    assert this_thread_name() == before  # the caller's own name is untouched


def test_role_names_fit_the_kernel() -> None:
    assert len(set(ROLES)) == len(ROLES)
    assert all(0 < len(name.encode()) <= 15 for name in ROLES)
