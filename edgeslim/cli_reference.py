"""docs/cli.md, generated from the click commands themselves: every command's and option's help, as
`--help` prints it. `tests/test_docs.py` fails when the file drifts from the commands; regenerate with
`python -m edgeslim.cli_reference > docs/cli.md`."""
from __future__ import annotations

import click

WIDTH = 100  # the help text's line width in the reference (independent of the terminal)


def _walk(command: click.Command, ctx: click.Context) -> list[tuple[str, str]]:
    out = [(ctx.command_path, command.get_help(ctx))]
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            out += _walk(sub, click.Context(sub, info_name=name, parent=ctx, terminal_width=WIDTH,
                                            max_content_width=WIDTH))
    return out


def reference() -> str:
    """The Markdown reference of every `edgeslim` command."""
    from edgeslim.cli import cli

    settings = {**cli.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}  # `-h` as the CLI has it
    root = click.Context(cli, info_name="edgeslim", **settings)
    parts = ["# Command-line reference\n",
             "Generated from the commands' own help (`python -m edgeslim.cli_reference > docs/cli.md`); "
             "every option of every command, as `edgeslim COMMAND --help` prints it.\n"]
    for path, text in _walk(cli, root):
        parts.append(f"## `{path}`\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(reference(), end="")
