"""Shared fixtures. Under CI=true a skipped test is a failure: nothing passes by skipping."""
import os

import pytest
import torch

import vitlab.models  # noqa: F401  (registers vl_* models)

THREADS = int(os.environ.get("VITLAB_TEST_THREADS", "2"))
torch.set_num_threads(THREADS)
# vitlab's caches (engine=auto's choices, model parameter counts) go to a folder of this test session, not the
# user's ~/.cache: a test sees no choice that an earlier run or another machine made
if "VITLAB_CACHE" not in os.environ:
    import tempfile

    os.environ["VITLAB_CACHE"] = tempfile.mkdtemp(prefix="vitlab-test-cache-")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI", "").lower() == "true" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"


@pytest.fixture(autouse=True)
def _restore_threads():
    """A test that changes torch's thread count (`--threads 1`, `torch.set_num_threads`) leaves the next one at the
    session's count."""
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)


@pytest.fixture
def engine_sandbox(tmp_path, monkeypatch):
    """engine=auto's cache in this test's own folder, and no trial / CPU-flag override from the environment."""
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VITLAB_ENGINE_TRIAL", raising=False)
    monkeypatch.delenv("VITLAB_CPU_FLAGS", raising=False)


@pytest.fixture
def tiny_model():
    return vitlab.create_model("vl_test_vit", num_classes=10)


import vitlab  # noqa: E402
