"""Where the project's data, scenarios and per-version virtual environments live."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
SCENARIOS = DATA / "scenarios"
DEFAULT_SCENARIO = SCENARIOS / "default.toml"
VENVS = ROOT / ".venvs"
ENVS = ROOT / "envs"
