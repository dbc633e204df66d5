"""Command-line options for config dataclasses: `--field value` for every field, each listed by --help.

Values are parsed by the field's default: numbers and strings as such, booleans as true/false (a bare
`--flag` means true), tuples as `a,b`, dicts as `key=value,key=value` (numbers as values). Dashes and
underscores in option names are the same (`--no-selfq` is `--no_selfq`). An option's help is the comment at the
end of its field's line, so the dataclass's source is the one place a setting is described.

A numeric field says which values it allows beside its default, `ranged(0.3, "[0, 1]")`: "> 0", ">= 1" or an
interval "[0, 1)"; a tuple has one range per element and a dict's range holds for every value. NaN and infinity
are never allowed. `read_options` checks every field, so a bad number stops a run before anything is built, in
one line that names the option and its range.
"""

import argparse
import ast
import dataclasses
import inspect
import io
import math
import textwrap
import tokenize
from collections.abc import Callable
from typing import Any


def ranged(default: Any, allowed: str | tuple[str, ...]) -> Any:
    """A dataclass field with its allowed values (module docstring); a callable default is a default_factory."""
    if callable(default):
        return dataclasses.field(default_factory=default, metadata={"range": allowed})
    return dataclasses.field(default=default, metadata={"range": allowed})


def within(value: Any, allowed: str) -> bool:
    """Whether a finite number lies in `allowed`: "> x", ">= x" or an interval such as "[0, 1)"."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if allowed[0] in "[(":
        low, high = (float(bound) for bound in allowed[1:-1].split(","))
        above = value >= low if allowed[0] == "[" else value > low
        return above and (value <= high if allowed[-1] == "]" else value < high)
    relation, bound = allowed.split()
    return value >= float(bound) if relation == ">=" else value > float(bound)


def range_error(name: str, value: Any, allowed: str) -> str | None:
    """None if `value` (a number, a tuple or a dict of them) is allowed; else the one-line error."""
    if isinstance(value, dict):
        bad = [f"{key}={item}" for key, item in value.items() if not within(item, allowed)]
        return f"--{name}: every value must be a finite number {allowed}, got {', '.join(bad)}" if bad else None
    if isinstance(value, tuple):
        bad = [f"element {i + 1} ({item}) must be {describe(rule)}"
               for i, (item, rule) in enumerate(zip(value, allowed)) if not within(item, rule)]
        return f"--{name} {show_value(value)}: {'; '.join(bad)}" if bad else None
    return None if within(value, allowed) else f"--{name} must be {describe(allowed)}, got {value}"


def describe(allowed: str) -> str:
    return f"a finite number in {allowed}" if allowed[0] in "[(" else f"a finite number {allowed}"


def check_ranges(cfg: Any) -> None:
    """Raise ValueError naming the first field of dataclass instance `cfg` whose value is outside its range."""
    for f in dataclasses.fields(cfg):
        if "range" in f.metadata and (error := range_error(f.name, getattr(cfg, f.name), f.metadata["range"])):
            raise ValueError(error)


def number(kind: type, allowed: str) -> Callable[[str], Any]:
    """An argparse `type` for a plain option: the text as `kind`, refused outside `allowed`."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {describe(allowed)}, got {text!r}") from None
        if not within(value, allowed):
            raise argparse.ArgumentTypeError(f"must be {describe(allowed)}, got {text}")
        return value

    return parse


def parse_value(text: str, like: Any) -> Any:
    if isinstance(like, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(like, dict):
        pairs = [item.split("=", 1) for item in text.split(",") if item]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"expected key=value,key=value, got {text!r}")
        return {k: float(v) for k, v in pairs}
    if isinstance(like, tuple):
        return tuple(type(x)(v) for x, v in zip(like, text.split(","), strict=True))
    return type(like)(text) if like is not None else text


def show_value(value: Any) -> str:
    """A value as it is written on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return ",".join(f"{k}={v:g}" for k, v in value.items()) or "''"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value) if value != "" else "''"


def field_comments(cls: type) -> dict[str, str]:
    """The comment that ends each field's line in the source of dataclass `cls`."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    [node] = ast.parse(source).body
    return {statement.target.id: comments[statement.end_lineno] for statement in node.body
            if isinstance(statement, ast.AnnAssign) and statement.end_lineno in comments}


def value_type(like: Any) -> Callable[[str], Any]:
    """What argparse calls on an option's text: parse_value, its errors reported with the option's name."""

    def parse(text: str) -> Any:
        try:
            return parse_value(text, like)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def metavar(like: Any) -> str:
    if isinstance(like, bool):
        return "true|false"
    if isinstance(like, dict):
        return "KEY=VALUE,..."
    if isinstance(like, tuple):
        return ",".join(type(x).__name__.upper() for x in like)
    return type(like).__name__.upper() if like is not None else "VALUE"


def add_options(parser: argparse.ArgumentParser, cfg: Any, title: str) -> None:
    """An option for every field of the dataclass instance `cfg`, whose values are the defaults."""
    group = parser.add_argument_group(title)
    comments = field_comments(type(cfg))
    for f in dataclasses.fields(cfg):
        default = getattr(cfg, f.name)
        like = default if f.default is dataclasses.MISSING else f.default  # epochs=3 is still a float field
        flag = isinstance(like, bool)  # a bare --flag means true
        text = f"{comments.get(f.name, '')} (default: {show_value(default)})".replace("%", "%%")
        group.add_argument(f"--{f.name}", default=default, type=value_type(like), metavar=metavar(like),
                           nargs="?" if flag else None, const=True if flag else None, help=text)


def read_options(args: argparse.Namespace, cfg: Any) -> Any:
    """A copy of the dataclass instance `cfg` with the values the command line gave its fields; ValueError names
    the first one outside its range."""
    cfg = dataclasses.replace(cfg, **{f.name: getattr(args, f.name) for f in dataclasses.fields(cfg)})
    check_ranges(cfg)
    return cfg


def underscored(argv: list[str]) -> list[str]:
    """The command line with dashes in option names written as underscores: --no-selfq -> --no_selfq."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, equals, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + equals + value
        out.append(arg)
    return out
