"""The repository's promises to a newcomer: README's commands are the ones CI and setup use."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_starts_with_the_main_job_and_the_test_command():
    main_job, tests = readme_commands()[:2]
    assert main_job == "bash scripts/setup.sh && .venv/bin/ucdseg demo"
    assert tests.startswith("bash scripts/setup.sh --dev && ") and "pytest" in tests


def test_ci_runs_exactly_readmes_test_command():
    ci_lines = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l and not l.startswith("#")]
    assert ci_lines[-1] == readme_commands()[1]
