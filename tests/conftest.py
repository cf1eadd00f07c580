"""Shared fixtures. Tests run once per supported vLLM environment (see .ci/run); GPU tests are marked `gpu`."""
from __future__ import annotations

import pytest

from diaglib import compat


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite the golden files under tests/golden/ from what the installed vLLM says")


@pytest.fixture
def golden(request):
    """Compare JSON-ready data with tests/golden/NAME (rewritten instead under --update-golden)."""
    import json
    from pathlib import Path

    def check(name: str, data) -> None:
        path = Path(__file__).parent / "golden" / name
        text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
        if request.config.getoption("--update-golden"):
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
            return
        if not path.exists() and compat.installed() not in compat.CI:
            pytest.skip(f"no golden file {path.name}: golden files are kept for the CI releases only")
        assert path.exists(), f"no golden file {path.name}; create it with pytest --update-golden"
        assert json.loads(text) == json.loads(path.read_text()), f"differs from {path.name} (pytest --update-golden)"

    return check


def _has_gpu() -> bool:
    from diaglib.whatif import real_gpu_present

    return real_gpu_present()


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):  # not item.keywords: a folder named gpu is a keyword too
            item.add_marker(skip)


@pytest.fixture(scope="session")
def scenario_name() -> str:
    """The seed scenario (data/scenarios/default.toml), answered by the vLLM installed here."""
    return "default"


_SEED: dict = {}


@pytest.fixture(scope="session")
def scenario(scenario_name):
    """The seed scenario resolved by the installed vLLM (what-if H20 x 8 without a GPU)."""
    from diaglib.scenario import load

    _SEED["scenario"] = load(scenario_name)
    return _SEED["scenario"]


def _seed_gpu_back() -> None:
    """The seed's what-if GPU impersonated again where an earlier test (in any order) switched to another."""
    from diaglib import whatif

    sc = _SEED.get("scenario")
    if sc is not None and sc.simulated and whatif.active_gpu() not in (None, sc.gpu):
        whatif.activate(sc.gpu)


@pytest.fixture(autouse=True, scope="module")
def _seed_gpu_per_module(request):
    """The seed resolved before any module's own fixtures: vLLM is imported under the seed's GPU whatever the
    test order (some of vLLM's module-level values keep the GPU they were first computed for)."""
    if compat.installed():
        request.getfixturevalue("scenario")
    _seed_gpu_back()


@pytest.fixture(autouse=True)
def _seed_gpu_per_test(request):
    if "scenario" in request.fixturenames:
        _seed_gpu_back()
