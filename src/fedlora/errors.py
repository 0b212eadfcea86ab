"""The errors a user can fix: a bad config, a bad data file. The CLI prints their message,
one line naming the field or file, and exits with code 2; anything else is a bug. This
module imports nothing heavy, so `fedlora --help` and the CLI's error handling never pull
in torch."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts where it can be."""


class DataError(ConfigError):
    """A data file (or hub dataset) that cannot be used as the config says."""


def one_line(err: BaseException) -> str:
    """The error's message on one line (library messages often span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def chain(err: BaseException) -> list[BaseException]:
    """`err` and the exceptions it wraps, outermost first (libraries wrap the parser's error)."""
    out = [err]
    while (inner := out[-1].__cause__ or out[-1].__context__) is not None and inner not in out:
        out.append(inner)
    return out


def describe(err: BaseException) -> str:
    """What is wrong with the input, in words a user can act on."""
    errors = chain(err)
    text = one_line(errors[-1])
    if any(isinstance(e, UnicodeDecodeError) or "invalid utf8" in one_line(e).lower() for e in errors):
        return "not UTF-8 text; save the file as UTF-8"
    if "corresponds to no data" in one_line(err) or "No columns to parse" in text:
        return "no data rows"
    if isinstance(errors[-1], KeyError):
        return f"a record has no field {text}"
    return text if len(text) <= 200 else text[:197] + "..."
