"""Shared fixtures; tests marked ``gpu`` are skipped where CUDA is missing."""

from __future__ import annotations

import logging

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _project_logging():
    """Undo what a test's ``hybridvl`` command did to the project's logger (its level, and a handler on the
    test's captured stderr, closed once the test ends), so that no test sees another's log setup."""
    project = logging.getLogger("hybridvl")
    level, handlers = project.level, list(project.handlers)
    yield
    project.setLevel(level)
    project.handlers[:] = handlers


@pytest.fixture(autouse=True)
def registry_snapshot():
    """Restore the mixer registry after each test, so that letters a test (or a study's plugin) registers do
    not reach other tests."""
    from hybridvl.mixers import registry

    by_letter, by_name = dict(registry._BY_LETTER), dict(registry._BY_NAME)
    yield
    registry._BY_LETTER.clear()
    registry._BY_LETTER.update(by_letter)
    registry._BY_NAME.clear()
    registry._BY_NAME.update(by_name)
