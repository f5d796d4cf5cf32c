"""Run the README's and the docs pages' Python blocks and `edgeslim ...` command lines in a temporary folder.

The two set-up commands (install + demo, tests) are run by .ci/run, not here.
"""
import re
import shlex
from pathlib import Path

import pytest

from edgeslim.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


DOCS = README.parent / "docs"
# the pages whose blocks run after the README's, in this order, in the same folder (they reuse its files)
PAGES = ("adapters.md", "recipes-and-budgets.md", "models.md", "int8.md", "llm.md", "factorized-convolutions.md",
         "pruning.md", "mpo.md", "super-resolution.md", "python-api.md", "adding-a-compressor.md", "security.md",
         "optimize.md")


def blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    usage = text.split("## The command line", 1)[1]  # everything after the set-up section
    for page in PAGES:
        usage += "\n" + (DOCS / page).read_text()
    return re.findall(r"```(\w+)\n(.*?)```", usage, flags=re.S)


def test_every_docs_page_with_commands_is_run():
    """A page that shows commands is in PAGES (devices.md runs against loopback SSH in test_device.py; cli.md
    is the generated reference; architecture.md's example runs in test_docs.py; data.md lists packages)."""
    elsewhere = {"devices.md", "cli.md", "architecture.md", "data.md", "toolchain.md"}
    for page in sorted(DOCS.glob("*.md")):
        if page.name not in elsewhere:
            assert page.name in PAGES, f"docs/{page.name} is not run by tests/test_readme.py"


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
