"""The README's commands are the ones CI and people run."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    commands = _readme_commands()
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_both_commands_share_one_install_step():
    bench, tests = (c for c in _readme_commands()[:2])
    assert bench.endswith("resnet-fused bench") and "pytest" in tests
    install = bench.rsplit(" && ", 1)[0]
    assert tests.startswith(install + " && ")
