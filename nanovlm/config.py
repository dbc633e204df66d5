"""Command-line overrides for config dataclasses: `--field value` for every field.

Values are parsed by the field's default: numbers and strings as such, booleans as true/false (a bare
`--flag` means true), tuples as `a,b`, dicts as `key=value,key=value` (numbers as values).
"""

import dataclasses
from typing import Any


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


def override(argv: list[str], *configs: Any) -> list[Any]:
    """Copies of the dataclasses `configs` with the `--field value` pairs of argv applied to whichever has the
    field (the first one that has it); unknown fields are errors."""
    fields, owner = {}, {}
    for index, cfg in reversed(list(enumerate(configs))):
        for f in dataclasses.fields(cfg):
            fields[f.name], owner[f.name] = getattr(cfg, f.name), index
    changes: list[dict] = [{} for _ in configs]
    i = 0
    while i < len(argv):
        name = argv[i].removeprefix("--").replace("-", "_")
        if not argv[i].startswith("--") or name not in fields:
            raise SystemExit(f"unknown option {argv[i]!r}; options: {' '.join('--' + f for f in fields)}")
        bare_flag = isinstance(fields[name], bool) and (i + 1 == len(argv) or argv[i + 1].startswith("--"))
        try:
            changes[owner[name]][name] = True if bare_flag else parse_value(argv[i + 1], fields[name])
        except (ValueError, IndexError) as e:
            raise SystemExit(f"bad value for {argv[i]}: {e}") from None
        i += 1 if bare_flag else 2
    return [dataclasses.replace(cfg, **change) for cfg, change in zip(configs, changes)]
