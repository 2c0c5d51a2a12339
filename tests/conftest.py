"""A real capsd for integration tests: a subprocess on a free port, real workers, real sherpa-onnx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Capsd


@pytest.fixture
def start_capsd(tmp_path: Path) -> Iterator[Any]:
    started: list[Capsd] = []

    def start(config: dict[str, dict[str, Any]] | None = None, wait: bool = True, **options: Any) -> Capsd:
        d = tmp_path / f"capsd{len(started)}"
        d.mkdir()
        capsd = Capsd(d, config or {}, wait, **options)
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
