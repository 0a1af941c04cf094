"""A pytest plugin (loaded by conftest.py): under CI=true a skipped test, or a test file
skipped at import (pytest.importorskip), fails the run. CI installs every test
dependency, so a skip there can only hide a missing one."""

import os

import pytest


def _in_ci():
    return os.environ.get("CI", "").lower() == "true"


def _fail_skip(report, what):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"{what} skipped under CI=true (a skip in CI hides a missing dependency): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        _fail_skip(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _in_ci() and report.skipped:
        _fail_skip(report, collector.nodeid)
