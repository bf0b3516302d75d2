"""The README's "Use" snippets run as pasted, and the README names only commands that exist."""

import re
from pathlib import Path

from dami_jax import cli

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_use_snippets_run_as_pasted(capsys):
    snippets = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
    assert len(snippets) == 2  # the model, then the engine, in one session
    namespace = {}
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "Answer: 92" in out
    assert out.count(" stop ") + out.count(" length ") == 3  # the engine's three results


def test_readme_commands_exist():
    commands = set(re.findall(r"`dami-jax ([a-z][a-z-]*)", README))
    parser = cli.build_parser()
    assert len(commands) >= 5
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    assert commands <= set(subcommands), commands - set(subcommands)
