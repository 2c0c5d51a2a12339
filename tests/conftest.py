"""Every test's tier, checked; a real capsd for integration tests: a subprocess on a free port, real
workers, real sherpa-onnx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Capsd

TIERS = ("unit", "integration", "system")  # registered in pyproject.toml


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: an untiered test fails every run
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    wrong = [item.nodeid for item in items if sum(item.get_closest_marker(t) is not None for t in TIERS) != 1]
    if wrong:
        raise pytest.UsageError(f"each test needs exactly one of the markers {', '.join(TIERS)}: " + " ".join(wrong))


@pytest.fixture
def start_capsd(tmp_path: Path) -> Iterator[Any]:
    started: list[Capsd] = []

    def start(
        config: dict[str, dict[str, Any]] | None = None,
        wait: bool = True,
        directory: Path | None = None,
        **options: Any,
    ) -> Capsd:
        """A Capsd (options: its own) in a new directory of tmp_path, or in `directory`; stopped after the test."""
        if directory is None:
            directory = tmp_path / f"capsd{len(started)}"
            directory.mkdir()
        capsd = Capsd(directory, config or {}, wait, **options)
        started.append(capsd)
        return capsd

    yield start
    for capsd in started:
        capsd.stop()


@pytest.fixture(scope="session")
def heavy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from capsd.selftest.build import build_paraformer

    out = tmp_path_factory.mktemp("heavy")
    build_paraformer(out, heavy=True)
    return out
