"""Options declared once, as dataclass fields, and rendered as click options and pipeline TOML keys.

Every option of `prefpipe train`, `precompute`, `eval`, `data check` and `pipeline` is one field of a settings
dataclass (TrainConfig and its groups, PrecomputeConfig, GenSettings, ...): its name, type, default, choices and
help live in that field, written with `opt(...)`. The CLIs generate their click options from the dataclasses and
build the dataclass back from the parsed values (`cli_options`, `from_cli`, `build`); the pipeline reads its TOML
tables into the same classes, so a train or precompute option is a pipeline key by construction.

Rules the renderers follow, so that users see what they always saw:

- The option's name is the field's name unless `opt(name=...)` says otherwise (`loss_types` is `--loss_type`,
  `Columns.prompt` is `--prompt_col`). A field holding another settings dataclass (`group(...)`) is flattened:
  its options appear under their own names, after the options declared before it, unless the class lists its
  options' order in `OPTION_ORDER` (a tuple of names; unlisted ones come last, in declaration order).
- A tuple field is a repeatable option on the command line and a list (or a single value) in TOML.
- A bool that defaults to false is a flag (`--fsdp`); one that defaults to true is its negation (`--no_progress`).
  The pipeline, where a flag must be able to override the file both ways, offers `--x/--no_x` for each.
- A validator raises `OptionError(self, ("lr",), "{} must be positive")`; the message names the option as the
  user wrote it: `--lr` on the command line, `key 'lr'` and the file for a TOML value.
- Every value given for a float option is a finite number: NaN is refused everywhere, and so is an infinity
  unless the field says `opt(allow_inf=True)` (where infinity means "no limit"). `build` checks this for every
  settings dataclass before its `__post_init__` runs, so a validator never sees NaN (which passes `lr <= 0`).
- A string option declared with `opt(escapes=True)` (prompt templates, markers) turns a typed `\\n` and `\\t`
  into a newline and a tab (`\\\\` into one backslash): a shell passes `'Q: {question}\\nA: '` as a backslash
  and an n, and a template with a literal backslash-n silently changes every prompt.
- `-h` wraps at the terminal's width; a string default holding a newline, a tab or leading/trailing space is
  shown as its Python repr (`'\\n\\nAssistant:'`), so the help shows where it starts and ends.

Adding an option: add one field with `opt(default, help=...)` (plus `choices=` from the module that owns the
list) to the settings dataclass of the command that uses it, and read it where it is needed. The command line
flag, its `-h` entry with the default, the pipeline key (in the section of that dataclass) and the TOML type check
follow from the field. Validate it in the dataclass's `__post_init__` with `OptionError`. If another command needs
the same option, declare its field there with `same_as(Owner, "name")` instead of repeating default and help.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any

from prefpipe.errors import UserError
from prefpipe.wording import did_you_mean

# The compute dtypes every model-loading command accepts (auto: bf16 on GPUs that support it, float32 on CPU).
DTYPES = ("auto", "float32", "bfloat16", "float16")


def opt(default: Any = MISSING, *, help: str = "", choices=None, name: str | None = None, required: bool = False,
        path: bool = False, metavar: str | None = None, default_text: str | None = None, option: bool = True,
        off_help: str | None = None, factory: Any = MISSING, allow_inf: bool = False, escapes: bool = False):
    """A dataclass field that is also an option. `default_text` describes a None default ("max_length // 2");
    `path` marks a file or directory (relative to a TOML file's directory there); `option=False` keeps a field
    out of every CLI and TOML table (it is set by code); `off_help` is the help of `--no_x` for a bool that
    defaults to true; `allow_inf` lets a float option be infinite (NaN never is); `escapes` decodes a typed
    `\\n`/`\\t` in a string option (see the module docstring)."""
    md = {"help": help, "choices": tuple(choices) if choices is not None else None, "name": name,
          "required": required, "path": path, "metavar": metavar, "default_text": default_text, "option": option,
          "off_help": off_help, "allow_inf": allow_inf, "escapes": escapes}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


def group(cls, required: bool = False):
    """A field holding another settings dataclass, whose options are flattened into this one's."""
    if required:
        return field(metadata={"group": True})
    return field(default_factory=cls, metadata={"group": True})


def same_as(owner, name: str, **override):
    """The field `name` of `owner` again (same default, choices, help unless overridden): one declaration for an
    option that several commands take."""
    f = next(f for f in dataclasses.fields(owner) if f.name == name)
    md = {**f.metadata, **override}
    if f.default_factory is not MISSING:
        return field(default_factory=f.default_factory, metadata=md)
    return field(default=f.default, metadata=md)


@dataclass(frozen=True)
class Option:
    """One option as the renderers see it."""
    name: str  # the CLI flag without dashes and the TOML key
    kind: str  # str | int | float | bool
    multiple: bool  # a tuple field
    default: Any  # MISSING when required
    required: bool
    help: str
    choices: tuple | None
    path: bool
    metavar: str | None
    default_text: str | None
    off_help: str | None
    escapes: bool = False

    def shown_default(self) -> str | None:
        """The default as `-h` shows it, or None when there is nothing to show."""
        if self.default_text:
            return self.default_text
        if self.default is MISSING or self.default is None or self.default == "" or self.kind == "bool":
            return None
        if self.multiple:
            return ", ".join(_shown(x) for x in self.default)
        return _shown(self.default)


def _shown(value) -> str:
    """A default as help text: a string whose whitespace would vanish in the help (a newline, a tab, a leading or
    trailing space) as its repr, anything else as str."""
    if isinstance(value, str) and (not value.isprintable() or value != value.strip()):
        return repr(value)
    return str(value)


def _kind(hint) -> tuple[str, bool]:
    """(scalar kind, multiple) of a field's type: str, int, float, bool, `X | None`, `tuple[X, ...]`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _kind(args[0])
    if origin is tuple:
        return _kind(typing.get_args(hint)[0])[0], True
    return hint.__name__, False


def options(cls, skip=()) -> list[Option]:
    """Every option of settings dataclass `cls`, groups flattened, in declaration order, less those in `skip`."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("group"):
            out += options(hints[f.name], skip)
            continue
        if not f.metadata.get("option", False):
            continue
        name = f.metadata.get("name") or f.name
        if name in skip:
            continue
        kind, multiple = _kind(hints[f.name])
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        md = f.metadata
        out.append(Option(name, kind, multiple, default, md["required"] or default is MISSING, md["help"],
                          md["choices"], md["path"], md["metavar"], md["default_text"], md["off_help"],
                          md.get("escapes", False)))
    order = getattr(cls, "OPTION_ORDER", None)
    if order:  # groups interleaved with the class's own options, as `-h` has always listed them
        rank = {n: i for i, n in enumerate(order)}
        out.sort(key=lambda o: rank.get(o.name, len(rank)))
    return out


def build(cls, values: dict):
    """`cls(...)` from {option name: value}; groups are built from the same dict, absent options keep defaults.
    Every given value passes `as_given` first (the rules every option follows), before `cls`'s own checks."""
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("group"):
            kw[f.name] = build(hints[f.name], values)
            continue
        name = f.metadata.get("name") or f.name
        if f.metadata.get("option", False) and name in values:
            v = values[name]
            kw[f.name] = as_given(cls, f, tuple(v) if isinstance(v, list) else v)
    return cls(**kw)


def as_given(owner, f: dataclasses.Field, value):
    """`value` for field `f` of `owner` after the rules of every option: a float is a number (not NaN) and finite
    unless `allow_inf`; a string option with `escapes` has its typed escapes decoded. Raises `OptionError`."""
    for x in (value if isinstance(value, tuple) else (value,)):
        if isinstance(x, float) and math.isnan(x):
            raise OptionError(owner, (f.name,), "{} must be a number (got nan)")
        if isinstance(x, float) and math.isinf(x) and not f.metadata.get("allow_inf"):
            raise OptionError(owner, (f.name,), f"{{}} must be finite (got {x})")
    if f.metadata.get("escapes") and isinstance(value, str):
        return decode_escapes(value)
    return value


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def decode_escapes(text: str) -> str:
    """`\\n` and `\\t` typed as two characters to a newline and a tab, `\\\\` to one backslash; any other backslash
    stays as it is."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


def canonical_choice(value, choices):
    """`value` as spelled in `choices`, ignoring case (`DPO` is `dpo`), or None when it is not one of them."""
    if value in choices:
        return value
    if isinstance(value, str):
        for c in choices:
            if isinstance(c, str) and c.lower() == value.lower():
                return c
    return None


def check_choices(obj):
    """Raise `OptionError` for a field of `obj` whose value (or any item of it) is not among its choices; a value
    that differs from a choice only in case is replaced by the choice (choices are case-insensitive)."""
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        v = getattr(obj, f.name)
        if not choices or v is None:
            continue
        fixed = []
        for item in (v if isinstance(v, tuple) else (v,)):
            c = canonical_choice(item, choices) if item is not None else None
            if item is not None and c is None:
                raise OptionError(obj, (f.name,), "{} must be one of " + ", ".join(map(str, choices)) +
                                  f" (got {item!r}){did_you_mean(item, choices)}")
            fixed.append(c if item is not None else item)
        object.__setattr__(obj, f.name, tuple(fixed) if isinstance(v, tuple) else fixed[0])


# ---------------------------------------------------------------- errors

def _option_name(owner, field_name: str) -> str:
    for f in dataclasses.fields(owner):
        if f.name == field_name:
            return f.metadata.get("name") or f.name
    return field_name


def cli_style(name: str) -> str:
    return f"--{name}"


def toml_style(name: str) -> str:
    return f"key '{name}'"


class OptionError(UserError):
    """A bad option value, raised by a settings dataclass. `template` has one `{}` per field in `fields`; the
    message names each option as the user wrote it (see `render`). Plain `str(e)` uses the CLI form."""

    def __init__(self, owner, fields: tuple, template: str):
        self.names = tuple(_option_name(owner, f) for f in fields)
        self.template = template
        super().__init__(self.render())

    def render(self, style=cli_style) -> str:
        return self.template.format(*(style(n) for n in self.names))


# ---------------------------------------------------------------- click

@functools.cache
def _choice_class():
    import click

    class Choice(click.Choice):
        """click's case-insensitive choice, whose error also names the closest choice."""

        def convert(self, value, param, ctx):
            try:
                return super().convert(value, param, ctx)
            except click.BadParameter as e:
                hint = did_you_mean(str(value).lower(), self.choices)
                raise click.BadParameter(e.message.rstrip(".") + hint, ctx, param) from None
    return Choice


def _click_type(o: Option):
    if o.choices:
        return _choice_class()(o.choices, case_sensitive=False)
    return {"int": int, "float": float, "str": str}[o.kind]


ESCAPES_HELP = "Type \\n and \\t for a newline and a tab."


def _help(o: Option) -> str:
    text = o.help + (" " + ESCAPES_HELP if o.escapes else "")
    if o.shown_default() is not None:
        text += f" [default: {o.shown_default()}]"
    return text


def click_option(o: Option):
    """The option as `prefpipe train`/`precompute`/`eval`/`data check` take it."""
    import click

    flag = f"--{o.name}"
    if o.kind == "bool":
        if o.default:
            return click.option(f"--no_{o.name}", f"no_{o.name}", is_flag=True, help=o.off_help or o.help)
        return click.option(flag, o.name, is_flag=True, help=o.help)
    if o.required:
        return click.option(flag, o.name, required=True, type=_click_type(o), metavar=o.metavar, help=_help(o))
    default = o.default
    if o.multiple:
        default = tuple(default) if default is not None else ()
    return click.option(flag, o.name, type=_click_type(o), multiple=o.multiple, default=default,
                        show_default=False, metavar=o.metavar, help=_help(o))


def override_option(o: Option, name: str | None = None):
    """The option as `prefpipe pipeline` takes it: no default of its own (None: not given), so that only what
    was typed overrides the file; bools get both `--x` and `--no_x`."""
    import click

    name = name or o.name
    help = _help(o)
    if o.kind == "bool":
        return click.option(f"--{name}/--no_{name}", name, default=None, help=f"{help} [default: {o.default}]")
    return click.option(f"--{name}", name, type=_click_type(o), multiple=o.multiple, default=None,
                        metavar=o.metavar, help=help)


def cli_options(opts: list[Option]):
    """A decorator adding `opts` to a click command, in order."""
    def deco(f):
        for o in reversed(opts):
            f = click_option(o)(f)
        return f
    return deco


def from_cli(opts: list[Option], kwargs: dict) -> dict:
    """{option name: value} from the keyword arguments click passed for `opts` (popped from `kwargs`)."""
    out = {}
    for o in opts:
        if o.kind == "bool" and o.default:
            out[o.name] = not kwargs.pop(f"no_{o.name}")
        else:
            out[o.name] = kwargs.pop(o.name)
    return out
