"""The README's "Use" snippet runs as pasted, and the README names only commands that exist."""

import re
from pathlib import Path

from dami_jax import cli

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_use_snippet_runs_as_pasted(capsys):
    (snippet,) = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    exec(compile(snippet, "README.md", "exec"), {})
    assert "Answer: 92" in capsys.readouterr().out


def test_readme_commands_exist():
    commands = set(re.findall(r"`dami-jax ([a-z][a-z-]*)", README))
    parser = cli.build_parser()
    assert len(commands) >= 5
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    assert commands <= set(subcommands), commands - set(subcommands)
