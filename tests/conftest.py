"""Shared fixtures: hypothesis profiles, tiny random models, and the embedded SmolLM2 (converted once, cached)."""

from __future__ import annotations

import os

from jaxtyping import install_import_hook

# Shapes in the code (issue 21 item 5): the jaxtyping annotations of these modules' tensor functions are checked at
# every call in the whole test suite (beartype, from the test extra). Installed before anything imports tpsurgery.
SHAPE_CHECKED = ("tpsurgery.ops", "tpsurgery.masks", "tpsurgery.backends.walk", "tpsurgery.backends.hooked",
                 "tpsurgery.backends.surgery", "tpsurgery.backends.pooling")
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
