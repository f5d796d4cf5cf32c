"""Run the README's Python blocks and `edgeslim ...` command lines in a temporary folder.

The two set-up commands (install + demo, tests) are run by .ci/run, not here.
"""
import re
import shlex
from pathlib import Path

import pytest

from edgeslim.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    usage = text.split("## The command line", 1)[1]  # everything after the set-up section
    return re.findall(r"```(\w+)\n(.*?)```", usage, flags=re.S)


def test_readme_has_the_two_setup_commands():
    setup = README.read_text().split("## Set up", 1)[1].split("## The command line", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
    assert len(commands) == 2
    assert "pip install torch==2.13.0" in commands[0] and commands[0].strip().endswith("edgeslim run")
    assert "pytest" in commands[1]
    assert "python -m pytest" in (README.parent / ".ci" / "run").read_text()


@pytest.mark.slow  # ~50 s on 2 cores: the README's commands on the packaged models and BBC News
def test_readme_blocks_run(in_tmp):
    ran = 0
    for lang, body in blocks():
        if lang == "toml":
            Path("recipe.toml").write_text(body)
        elif lang == "python":
            exec(compile(body, "README.md", "exec"), {})
            ran += 1
        elif lang == "bash":
            for line in body.strip().splitlines():
                args = shlex.split(line)
                assert args[0] == "edgeslim", line
                assert main(args[1:]) == 0, line
                ran += 1
    assert Path("astronaut-x3.png").is_file() and Path("mlp-svd.onnx").is_file()
    assert ran >= 9
