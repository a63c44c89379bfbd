"""The README's python blocks run, in order, in one namespace."""

import os
import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_readme_code_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"README.md[python block {i}]", "exec"), namespace)
    finally:
        os.chdir(old)


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    shell = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert "python -m jaxflat demo" in shell[0]
    assert "pytest" in shell[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert shell[1].strip() in ci
