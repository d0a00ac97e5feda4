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


def test_readmes_commands_name_configs_and_paths_that_exist_after_the_demo():
    """Issue 24, item 9: after the two set-up commands (and the demo, the first), the README's
    commands run as written: the environment is activated first, every config named resolves
    (packaged configs by name), and every ``runs/demo/...`` path is one the demo writes (its
    methods, its task's last step)."""
    import yaml

    from ucdseg.cli import DEMO_METHODS
    from ucdseg.config import resolve_config
    from ucdseg.tasks import get_task

    blocks = re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), re.S)
    using = next(b for b in blocks if "ucdseg configs" in b)
    assert using.splitlines()[0] == "source .venv/bin/activate"
    demo = yaml.safe_load((ROOT / "src" / "ucdseg" / "configs" / "demo.yaml").read_text())
    last_step = get_task(demo["data"]["dataset"], demo["task"]["name"]).num_steps - 1
    paths = re.findall(r"runs/demo/(\S+?)/checkpoints/step(\d+)\.pt", using)
    assert paths and all(m in DEMO_METHODS and int(s) == last_step for m, s in paths)
    for folder in re.findall(r"runs/demo/([^/\s]+)(?=\s|$)", using):
        assert folder in DEMO_METHODS, folder
    names = [line.split()[2] for b in blocks for line in b.splitlines() if line.startswith("ucdseg run ")]
    names += re.findall(r"-m ucdseg\.cli run (\S+)", "\n".join(blocks))
    own = {"shapes.yaml", "run.yaml"}  # the user's own files, described beside them
    assert len([n for n in names if n not in own]) >= 6
    for name in names:
        if name not in own:
            assert resolve_config(name).is_file(), name
    python = re.search(r"```python\nimport ucdseg\n(.+?)```", (ROOT / "README.md").read_text(), re.S)
    assert python and len(python.group(0).splitlines()) <= 12
    assert resolve_config(re.search(r'ucdseg\.run\("([^"]+)"', python.group(1)).group(1)).is_file()


def test_the_license_is_an_spdx_expression():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    # SPDX strings in project.license need setuptools 77 (PEP 639); the table form is deprecated
    assert pyproject["build-system"]["requires"] == ["setuptools>=77"]
