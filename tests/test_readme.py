"""The README's first two commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_commands_are_run_by_ci():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    assert len(blocks) >= 2
    demo, tests = blocks[0].strip(), blocks[1].strip()
    assert "orthrus-export build --model tiny" in demo and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert demo in ci and tests in ci
    assert readme.index(demo) < 600, "the two commands must open the README"
