"""The test suite's own scheduling (tests/conftest.py): the longest modules are handed to the xdist
workers first, everything else keeps its collection order, and ``-n auto`` is capped."""
from __future__ import annotations

import os
from types import SimpleNamespace

from tests import conftest


def test_longest_modules_come_first_and_the_rest_keeps_its_order():
    first, second = conftest.LONGEST_MODULES[0], conftest.LONGEST_MODULES[1]
    ids = ["tests/unit/test_a.py::x", f"{second}::p", "tests/unit/test_b.py::y", f"{first}::q", f"{second}::r",
           "tests/unit/test_a.py::z"]
    items = [SimpleNamespace(nodeid=i) for i in ids]
    conftest._longest_first(items)
    assert [i.nodeid for i in items] == [f"{first}::q", f"{second}::p", f"{second}::r", "tests/unit/test_a.py::x",
                                         "tests/unit/test_b.py::y", "tests/unit/test_a.py::z"]


def test_listed_modules_exist_and_workers_are_capped():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    missing = [m for m in conftest.LONGEST_MODULES if not os.path.exists(os.path.join(root, m))]
    assert not missing, missing  # a renamed module would silently lose its early start
    workers = conftest.pytest_xdist_auto_num_workers(None)
    assert 1 <= workers <= 4 and workers <= max(1, len(os.sched_getaffinity(0)))
