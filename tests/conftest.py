"""Shared fixtures: hypothesis profiles, tiny random models, and the embedded SmolLM2 (converted once, cached)."""

from __future__ import annotations

import os

import beartype  # noqa: F401  before nnsight, which adds an unhashable `object.save` that beartype's import trips on
from jaxtyping import install_import_hook

# Shapes in the code (issue 21 item 5): the jaxtyping annotations of these modules' tensor functions are checked at
# every call in the whole test suite (beartype, from the test extra). Installed before anything imports tpsurgery.
SHAPE_CHECKED = ("tpsurgery.ops", "tpsurgery.masks", "tpsurgery.batch", "tpsurgery.backends.walk",
                 "tpsurgery.backends.hooked", "tpsurgery.backends.surgery", "tpsurgery.backends.pooling")
install_import_hook(SHAPE_CHECKED, "beartype.beartype")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# `ci` keeps the whole suite inside CI's budget; `dev` digs deeper locally (HYPOTHESIS_PROFILE=dev).
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("dev", max_examples=1000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _private_embedding_cache(tmp_path_factory, monkeypatch):
    """The CLI stores embeddings by default (resume): tests keep them out of the user's cache."""
    monkeypatch.setenv("TPSURGERY_EMBEDDING_CACHE", str(tmp_path_factory.mktemp("embedding-cache")))


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct (float32), shared by the whole session. Never mutate it."""
    from tpsurgery.models import load_model

    return load_model("smollm2-135m")


# ------------------------------------------------------------------ the reliability table (docs/reliability.md)
# `pytest tests/test_reliability3.py --reliability-table` prints, per kind of failure the cases had before their fix
# (marker `reliability(item, before, now)`), how many cases were tried and how each ends now: a clear error, a
# correct result, or still the failure (raw traceback / silent wrong / data lost / hang / unsafe) when its test fails.
_RELIABILITY: list[tuple[dict, str]] = []


def pytest_addoption(parser):
    parser.addoption("--reliability-table", action="store_true",
                     help="print the cases-tried / clear-error / correct / still-failing table of docs/reliability.md")


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability(item, before, now): a hostile case of docs/reliability.md's table "
                                       "(before: what the case did before its fix; now: 'clear error' or 'correct')")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    mark = item.get_closest_marker("reliability")
    if mark is not None and (rep.when == "call" or (rep.when == "setup" and not rep.passed)):
        _RELIABILITY.append((mark.kwargs, rep.outcome))


def reliability_table(results) -> str:
    """The markdown table from ``(marker kwargs, outcome)`` pairs."""
    kinds = ["raw traceback", "silent wrong", "data lost", "hang", "unsafe", "missing"]
    rows = {k: [0, 0, 0, 0, 0] for k in kinds}  # tried, clear error, correct, still failing, skipped
    for kw, outcome in results:
        r = rows.setdefault(kw["before"], [0, 0, 0, 0, 0])
        r[0] += 1
        if outcome == "passed":
            r[1 if kw["now"] == "clear error" else 2] += 1
        elif outcome == "skipped":
            r[4] += 1
        else:
            r[3] += 1
    lines = ["| before the fix | cases tried | clear error now | correct now | still failing | skipped |",
             "|---|---:|---:|---:|---:|---:|"]
    total = [0, 0, 0, 0, 0]
    for kind, r in rows.items():
        if r[0]:
            lines.append(f"| {kind} | " + " | ".join(map(str, r)) + " |")
            total = [a + b for a, b in zip(total, r)]
    lines.append("| **total** | " + " | ".join(f"**{x}**" for x in total) + " |")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.getoption("--reliability-table") and _RELIABILITY:
        terminalreporter.write_line("")
        terminalreporter.write_line(reliability_table(_RELIABILITY))
