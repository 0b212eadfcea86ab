"""MkDocs hook: the configuration and command-line references, generated from the code at build time.

A page holds a marker comment and the build replaces it with tables made from the code itself,
so the reference cannot drift from it:

- `<!-- fedlora:config -->`: every field of the config models (`fedlora.config.RunConfig`, the
  method options, the device classes): key, type, default, constraint, description;
- `<!-- fedlora:config algorithm.NAME -->`: one method's options (on its concept page);
- `<!-- fedlora:cli -->`: every command and option of the `fedlora` argument parser;
- `<!-- fedlora:peaks -->`: the peak FLOPs/cycle/core per CPU family and dtype (fedlora.hardware).

Descriptions are the fields' attribute docstrings (the string literal right under a field, the
style config.py uses), read here from the classes' source with `ast`: the models themselves stay
as they are (no `use_attribute_docstrings`, so importing fedlora costs nothing more). A field
without one is reported as a MkDocs warning, which `mkdocs build --strict` (make docs) turns into
a failure: every field a config takes is documented.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import logging
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

log = logging.getLogger("mkdocs.plugins.fedlora")

MARKER = re.compile(r"<!--\s*fedlora:(config|cli|peaks)\s*([\w.-]*)\s*-->")


@dataclass(frozen=True)
class FieldDoc:
    """One row of the configuration reference."""

    key: str
    type: str
    default: str
    constraint: str
    description: str


# --- attribute docstrings -------------------------------------------------------------------


@cache
def attribute_docstrings(cls: type) -> dict[str, str]:
    """{field: the string literal right under its annotated assignment} of `cls` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass in (object, BaseModel) or not issubclass(klass, BaseModel):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, after in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def class_doc(cls: type) -> str:
    """The first paragraph of a class's own docstring ('' when it has none)."""
    doc = cls.__dict__.get("__doc__") or ""
    return inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ") if doc else ""


# --- types, defaults, constraints -----------------------------------------------------------


def type_name(tp: Any) -> str:
    """A type annotation as a reader writes it in YAML terms: `"a" | "b"`, `int | null`, `list[str]`."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (list, tuple, set):
        return f"list[{', '.join(type_name(a) for a in args if a is not Ellipsis)}]"
    if origin is dict:
        return f"mapping[{type_name(args[0])}, {type_name(args[1])}]"
    if isinstance(tp, type):
        if issubclass(tp, BaseModel):
            return "mapping"
        return {"str": "str", "int": "int", "float": "float", "bool": "bool", "Path": "path"}.get(
            tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def default_text(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    return value_text(value)


def value_text(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{escape_cell(value.encode('unicode_escape').decode())}`" if value else '`""`'
    if isinstance(value, (list, dict)):
        return f"`{escape_cell(json.dumps(value, ensure_ascii=False))}`"
    return f"`{escape_cell(str(value))}`"


BOUNDS = [(annotated_types.Ge, "ge", "≥"), (annotated_types.Gt, "gt", ">"),
          (annotated_types.Le, "le", "≤"), (annotated_types.Lt, "lt", "<"),
          (annotated_types.MinLen, "min_length", "length ≥"), (annotated_types.MaxLen, "max_length", "length ≤")]


def constraint_text(info: FieldInfo) -> str:
    """The field's declared bounds (validators that check more are described in its text)."""
    parts = []
    for meta in info.metadata:
        for kind, attr, sign in BOUNDS:
            if isinstance(meta, kind):
                parts.append(f"{sign} {getattr(meta, attr)}")
    return ", ".join(parts)


def escape_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --- walking the models ---------------------------------------------------------------------


def model_fields(model: type[BaseModel], prefix: str) -> list[FieldDoc]:
    """Every leaf field of `model` under `prefix`, nested models flattened to dotted keys."""
    rows: list[FieldDoc] = []
    docs = attribute_docstrings(model)
    for name, info in model.model_fields.items():
        key, tp = f"{prefix}{name}", info.annotation
        nested = nested_model(tp)
        if nested is not None and get_origin(tp) is not dict:
            rows.extend(model_fields(nested, f"{key}."))
            continue
        if nested is not None:  # a mapping of name → model: document the model's fields per name
            rows.append(FieldDoc(key, type_name(tp), default_text(info), constraint_text(info), docs.get(name, "")))
            rows.extend(model_fields(nested, f"{key}.<name>."))
            continue
        rows.append(FieldDoc(key, type_name(tp), default_text(info), constraint_text(info), docs.get(name, "")))
    return rows


def nested_model(tp: Any) -> type[BaseModel] | None:
    """The model a field holds (directly or as the values of a mapping), if any."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    if get_origin(tp) is dict:
        value = get_args(tp)[1]
        return value if isinstance(value, type) and issubclass(value, BaseModel) else None
    return None


def method_options() -> dict[str, type[BaseModel]]:
    """{method name: its options model}, from the method registry."""
    from fedlora.algorithms import ALGORITHMS

    return {name: options_by_name(name) for name in ALGORITHMS}


def options_by_name(name: str) -> type[BaseModel]:
    """The options model whose `name` is `name` (every method's options subclass MethodOptions)."""
    from fedlora.algorithms.base import MethodOptions

    for cls in all_subclasses(MethodOptions):
        field = cls.model_fields.get("name")
        if field is not None and field.default == name:
            return cls
    raise LookupError(f"no options model for method {name!r}")


def all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *all_subclasses(sub)]
    return out


def config_rows() -> dict[str, list[FieldDoc]]:
    """{section title: its rows}: the run config's sections in declaration order, then one section
    per method's `algorithm:` options."""
    from fedlora.config import RunConfig

    sections: dict[str, list[FieldDoc]] = {"top level": []}
    docs = attribute_docstrings(RunConfig)
    for name, info in RunConfig.model_fields.items():
        if name == "algorithm":
            continue
        nested = nested_model(info.annotation)
        if nested is None:
            sections["top level"].append(
                FieldDoc(name, type_name(info.annotation), default_text(info), constraint_text(info), docs.get(name, "")))
        else:
            sections[name] = model_fields(nested, f"{name}.")
    for method, options in method_options().items():
        sections[f"algorithm: {method}"] = method_rows(options)
    return sections


def method_rows(options: type[BaseModel]) -> list[FieldDoc]:
    rows = model_fields(options, "algorithm.")
    for i, row in enumerate(rows):
        if row.key == "algorithm.name" and not row.description:
            rows[i] = FieldDoc(row.key, row.type, "required", "", "selects this method; the other keys of "
                               "`algorithm:` are its options")
    return rows


def section_intro(section: str) -> str:
    from fedlora.config import RunConfig

    if section.startswith("algorithm: "):
        return class_doc(method_options()[section.removeprefix("algorithm: ")])
    info = RunConfig.model_fields.get(section)
    if info is None:
        return ""
    own = attribute_docstrings(RunConfig).get(section, "").replace("\n", " ")
    of_class = class_doc(nested_model(info.annotation))
    return " ".join(part for part in (own, of_class) if part)


# --- markdown -------------------------------------------------------------------------------


def table(rows: list[FieldDoc]) -> str:
    lines = ["| key | type | default | constraint | description |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| `{r.key}` | `{escape_cell(r.type)}` | {r.default} | {r.constraint} | "
                     f"{escape_cell(r.description)} |")
    return "\n".join(lines)


def undocumented(rows: list[FieldDoc]) -> list[str]:
    return [r.key for r in rows if not r.description]


def dataset_defaults_note() -> str:
    """The per-dataset defaults the registered datasets fill in for keys a config leaves out."""
    from fedlora.data.registry import registered_datasets

    lines = ["Defaults that depend on `data.dataset` (filled in only for keys the config leaves out):", ""]
    for dataset, spec in registered_datasets().items():
        pairs = ", ".join(f"`{k}`: {value_text(v)}" for k, v in spec.defaults.items())
        lines.append(f"- `{dataset}`: {pairs}")
    return "\n".join(lines)


def device_presets_note() -> str:
    from fedlora.devices import PRESETS

    lines = ["Built-in device classes (ours: orders of magnitude for edge boards and phones, not "
             "measurements), usable in `devices.assign` and `devices.mix`:", "",
             "| class | FLOP/s | uplink / downlink Mbit/s | max rank |", "| --- | --- | --- | --- |"]
    for name, c in PRESETS.items():
        lines.append(f"| `{name}` | {c.flops:.3g} | {c.uplink_mbps:g} / {c.downlink_mbps:g} | {c.max_rank} |")
    return "\n".join(lines)


def config_markdown() -> tuple[str, list[str]]:
    """The whole configuration reference and the keys without a description."""
    parts, missing = [], []
    for section, rows in config_rows().items():
        title = f"`{section}`" if section != "top level" else "Top level"
        intro = section_intro(section)
        parts.append(f"## {title}\n\n" + (f"{intro}\n\n" if intro else "") + table(rows))
        if section == "data":
            parts.append(dataset_defaults_note())
        if section == "devices":
            parts.append(device_presets_note())
        missing += undocumented(rows)
    return "\n\n".join(parts), missing


def method_markdown(method: str) -> tuple[str, list[str]]:
    rows = method_rows(method_options()[method])
    return table(rows), undocumented(rows)


def cli_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """Every command of the parser: its usage, what it does and a table of its arguments."""
    if parser is None:
        from fedlora.cli import build_parser

        parser = build_parser()
    return "\n\n".join(command_markdown(p, name, helptext) for name, p, helptext in commands(parser, parser.prog))


def commands(parser: argparse.ArgumentParser, name: str, helptext: str = "") -> list[tuple[str, argparse.ArgumentParser, str]]:
    """(command name, parser, its one-line help) for the parser and every subcommand, depth first."""
    out = [(name, parser, helptext)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for sub, subparser in action.choices.items():
                out += commands(subparser, f"{name} {sub}", helps.get(sub, ""))
    return out


def command_markdown(parser: argparse.ArgumentParser, name: str, helptext: str) -> str:
    depth = name.count(" ")
    heading = "#" * min(2 + max(depth - 1, 0), 4)
    usage = parser.format_usage().removeprefix("usage: ").strip()
    usage = re.sub(r"\s+", " ", usage)
    text = [f"{heading} `{name}`", ""]
    if helptext or parser.description:
        text += [(parser.description or helptext).replace("%%", "%"), ""]
    text += ["```text", usage, "```"]
    rows = [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
    if rows:
        text += ["", "| argument | default | meaning |", "| --- | --- | --- |"]
        for a in rows:
            text.append(f"| {argument_name(a)} | {argument_default(a)} | {escape_cell(argument_help(a))} |")
    return "\n".join(text)


def argument_name(a: argparse.Action) -> str:
    if not a.option_strings:
        optional = {"?": " (optional)", "*": " (any number)", "+": " (one or more)"}.get(str(a.nargs), "")
        return f"`{a.metavar or a.dest}`{optional}"
    flags = ", ".join(a.option_strings)
    if a.nargs == 0:
        return f"`{flags}`"
    metavar = a.metavar or (a.dest.upper() if not a.choices else "{" + ",".join(map(str, a.choices)) + "}")
    return f"`{flags} {metavar if isinstance(metavar, str) else ' '.join(metavar)}`"


def argument_default(a: argparse.Action) -> str:
    if a.required:
        return "required"
    if a.nargs == 0 or a.default in (None, argparse.SUPPRESS, []):
        return ""
    return f"`{a.default}`"


def argument_help(a: argparse.Action) -> str:
    text = (a.help or "").replace("%%", "%")
    if "%(" in text:
        text = text % {**vars(a), "prog": ""}
    if a.choices and not a.option_strings and a.metavar is None:
        text += f" (one of {', '.join(map(str, a.choices))})"
    return text


def peaks_markdown() -> str:
    """fedlora.hardware.CPU_FAMILIES as a table: what the benchmarks divide by."""
    from fedlora.hardware import CPU_FAMILIES

    lines = ["| CPU family | float32 FLOPs/cycle/core | bfloat16 FLOPs/cycle/core | why |", "| --- | --- | --- | --- |"]
    for family in CPU_FAMILIES.values():
        lines.append(f"| {family.name} | {family.float32} | {family.bfloat16} | {escape_cell(family.why)} |")
    return "\n".join(lines)


# --- the hook -------------------------------------------------------------------------------


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace each marker of a page with its generated reference."""

    def generate(match: re.Match[str]) -> str:
        kind, arg = match.group(1), match.group(2)
        if kind == "cli":
            return cli_markdown()
        if kind == "peaks":
            return peaks_markdown()
        if arg.startswith("algorithm."):
            text, missing = method_markdown(arg.removeprefix("algorithm."))
        else:
            text, missing = config_markdown()
        for key in missing:
            log.warning("%s: config field %s has no description (an attribute docstring under the field)",
                        page.file.src_uri, key)
        return text

    return MARKER.sub(generate, markdown)
