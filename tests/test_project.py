"""pyproject.toml's claims agree: the Pythons capsd supports, each of which .ci/run tests."""

import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

pytestmark = pytest.mark.unit

PYPROJECT = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())


def test_the_pythons_claimed_run_from_requires_python_up_and_include_this_one() -> None:
    prefix = "Programming Language :: Python :: "
    claimed = [tuple(map(int, c.removeprefix(prefix).split("."))) for c in PYPROJECT["project"]["classifiers"]
               if c.startswith(prefix + "3.")]  # fmt: skip
    major, oldest = claimed[0]
    assert claimed == [(major, minor) for minor in range(oldest, oldest + len(claimed))]
    assert PYPROJECT["project"]["requires-python"] == f">={major}.{oldest}"
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py{major}{oldest}"
    assert sys.version_info[:2] in claimed  # the tests run on a Python capsd claims
