"""Docs that cannot rot: every ``adbray …`` and ``python -m …`` command shown in README.md and docs/*.md
(code blocks, inline code, and the entrypoint after ``ray job submit … --``) parses against the real CLI:
the command and subcommand exist, every option exists and takes what it is given, choices are valid.
Placeholders (``NAME``, ``RUN_DIR``, ``<host>``) are filled in; ``[--opt]`` is read as ``--opt``."""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import click
import pytest

from pipelines.template import discover, load_template

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
START = re.compile(r"^(?:\$ )?(?:\.venv/bin/)?(adbray|python -m [\w.]+)(?=\s|$)")
# a placeholder word in a command -> a value of the right kind
PLACEHOLDERS = {"TEMPLATE": "riskcontrol", "T": "riskcontrol", "STEP": "data", "SPEC": "riskcontrol",
                "F": "riskcontrol/resource_group.yaml", "T.module": "riskcontrol.train"}


def _code_lines(text: str):
    """``(line, whole)``: lines of fenced code blocks (continuations joined; whole commands) and inline
    code spans (often a reference to a command, without its arguments)."""
    inside, pending = False, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if inside:
            pending += line.strip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            yield pending, True
            pending = ""
    for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL)):
        yield span, False


def _commands():
    found = {}
    for doc in DOCS:
        for line, whole in _code_lines(doc.read_text()):
            line = line.split(" # ")[0].split("  #")[0].strip().rstrip("&").strip()
            line = re.sub(r"^(?:[A-Z_]+=\S+ )+", "", line)  # VAR=value before the command
            if line.startswith("ray job submit") and " -- " in line:
                line = line.split(" -- ", 1)[1].strip()
            if START.match(line) and "|" not in line:
                line = re.sub(r"^(\$ )?(\.venv/bin/)?", "", line)
                found[line] = (doc.name, whole or found.get(line, ("", False))[1])
    return sorted((line, doc, whole) for line, (doc, whole) in found.items())


def _words(line: str) -> list[str]:
    line = re.sub(r"\[(--?[\w-]+(?: [^\]]+)?)\]", r"\1", line)  # optional parts: shown as given
    words = []
    for word in shlex.split(line.replace("...", "").replace("…", "")):
        if word in ("<step>", "STEP", "module"):  # "python -m T STEP": any step; checked without one
            continue
        word = re.sub(r"<[^>]+>", "x", word)
        words.append(PLACEHOLDERS.get(word, word.lower() if re.fullmatch(r"[A-Z][A-Z_]+", word) else word))
    return words


def _command_for(module: str) -> tuple[click.Command, list[str]]:
    """The click command ``python -m module`` runs, and words it puts before the user's."""
    templates = discover()
    if module in templates:
        return load_template(module).command(), []
    package = module.rpartition(".")[0]
    mod = importlib.import_module(module)
    main = getattr(mod, "main", None) or getattr(mod, "cli", None)
    if isinstance(main, click.Command):
        return main, []
    alias = re.search(r"step_alias\(\"(\w+)\"\)", Path(mod.__file__).read_text())
    if package in templates and alias:
        return load_template(package).command(), [alias.group(1)]  # python -m T.MODULE = python -m T STEP
    raise AssertionError(f"python -m {module}: no click command found")


def _parse(command: click.Command, name: str, args: list[str], parent=None, whole: bool = True) -> None:
    """Parse like click would before running; a reference (``whole=False``) may lack its arguments."""
    try:
        ctx = command.make_context(name, list(args), parent=parent, resilient_parsing=not whole)
    except click.exceptions.Exit:  # --help, --version
        return
    except click.BadParameter as e:
        if "does not exist" in e.format_message():  # a file on the reader's machine
            return
        raise
    if not whole:  # resilient parsing skips unknown options: check them here
        known = {o for p in command.get_params(ctx) for o in (*p.opts, *p.secondary_opts)}
        unknown = [w.split("=")[0] for w in args if w.startswith("-") and w.split("=")[0] not in known]
        if unknown and not isinstance(command, click.Group):
            raise click.NoSuchOption(unknown[0], ctx=ctx)
    if isinstance(command, click.Group):
        rest = [*ctx._protected_args, *ctx.args] if hasattr(ctx, "_protected_args") else \
            [*ctx.protected_args, *ctx.args]
        if not rest:
            return
        sub = command.get_command(ctx, rest[0])
        if sub is None:
            raise click.UsageError(f"no command {rest[0]!r} (commands: {', '.join(command.list_commands(ctx))})")
        _parse(sub, rest[0], rest[1:], ctx, whole)


COMMANDS = _commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 40, COMMANDS


@pytest.mark.parametrize("line,doc,whole", COMMANDS, ids=[c[:60] for c, _, _ in COMMANDS])
def test_a_documented_command_parses(line, doc, whole):
    words = _words(line)
    if not whole and words[-1].startswith("--"):
        words.append("x")  # `adbray submit --group`: the option named, its value left out
    if words[0] == "adbray":
        from deploy.cli import cli

        command, args = cli, words[1:]
    else:
        command, prefix = _command_for(words[2])
        args = prefix + words[3:]
    try:
        _parse(command, words[0], args, whole=whole)
    except click.UsageError as e:
        pytest.fail(f"{doc}: `{line}`: {e.format_message()}", pytrace=False)


def test_a_broken_command_is_caught():
    from deploy.cli import cli

    with pytest.raises(click.UsageError):
        _parse(cli, "adbray", ["group", "create", "--template", "recsys"])
    with pytest.raises(click.UsageError):
        _parse(load_template("riskcontrol").command(), "python", ["--no-such-flag"])
