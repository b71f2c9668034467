"""Click options built from the fields of ucad.config, shared by every command; --config files; one-line errors."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import Field, fields
from pathlib import Path

import click
from click.core import ParameterSource

from ucad import __version__
from ucad.config import CONFIG_CLASSES, FIELDS, Configs, checked_value, cli_parameter, field_kind, from_text
from ucad.data.layouts import LAYOUTS
from ucad.runtime.errors import RunInterrupted, UcadError

# the configuration a command is mostly about: its fields are listed first in --help
HOME_CONFIG = {"main": "run", "ucad": "model", "sampler": "learning", "dataset": "data"}
CLICK_TYPES = {"path": click.Path(), "folder": click.Path(file_okay=False), "layout": click.Choice(tuple(LAYOUTS))}
# what a run's config.json records beside the four configurations
RUN_RECORD_KEYS = ("version", "task_order", "device", "backbone_description", "input_norm_used", "input_mean",
                   "input_std", "patch_grid", "nn")
# PatchCore options that its command lines type, each with the one behaviour implemented here: read and ignored
PATCHCORE_ONLY = ("preprocessing", "aggregation", "patchscore", "patchoverlap", "patchsize_aggregate")


def config_parameters(command: str, only: tuple[str, ...] | None = None):
    """A decorator adding the click parameters of the configuration fields that `command` shows (`only`: these)."""
    classes = sorted(CONFIG_CLASSES, key=lambda name: name != HOME_CONFIG[command])
    return _adding([f for name in classes for f in fields(CONFIG_CLASSES[name])
                    if cli_parameter(f) and cli_parameter(f).command == command and (only is None or f.name in only)])


def shared_options(*names: str, renamed: dict[str, str] | None = None):
    """A decorator giving ucad.predict or ucad.evaluate the run's options of the named fields (`renamed`: field ->
    option there); values are checked as click parses them, since these commands build no Configs to check."""
    return _adding([FIELDS[name][1] for name in names], renamed, check_now=True)


def _adding(config_fields: list[Field], renamed: dict[str, str] | None = None, check_now: bool = False):
    def decorate(function):
        for config_field in reversed(config_fields):  # click lists the last decorator first
            function = _click_parameter(config_field, (renamed or {}).get(config_field.name), check_now)(function)
        return function
    return decorate


def _click_parameter(config_field: Field, renamed: str | None, check_now: bool):
    parameter = cli_parameter(config_field)
    keywords = dict(parameter.click)
    kind = keywords.pop("type", None)
    if not keywords.get("is_flag"):  # text that ucad.config reads and checks as it does a file's values
        keywords["type"] = CLICK_TYPES.get(kind, click.STRING)
        text = f"[{'|'.join(kind)}]" if isinstance(kind, tuple) else \
            {"int": "INTEGER", "float": "FLOAT"}.get(field_kind(config_field)[0], "TEXT")
        keywords["metavar"] = parameter.metavar or (None if kind in CLICK_TYPES else text)

    def read(context, option, value):
        value = from_text(config_field, value)
        try:
            return checked_value(config_field, value, renamed or parameter.typed) if check_now else value
        except UcadError as error:
            raise click.BadParameter(str(error)) from None

    if not parameter.declarations:  # required once its sub-command is given (a left-out one keeps the default)
        return click.argument(config_field.name, callback=read, **keywords)
    default = config_field.default
    if keywords.get("multiple") and not isinstance(default, tuple):
        default = (default,)  # -b: a multiple option in the released CLI, one value here
    return click.option(*([renamed] if renamed else parameter.declarations), config_field.name, default=default,
                        show_default=not keywords.get("is_flag") and not keywords.get("hidden"), help=parameter.help,
                        callback=read, **keywords)


def build_configs(typed: dict, recipes: list[dict[str, dict]] = ()) -> Configs:
    """The four configurations: the fields' defaults, then each --config file's sections in order, then the values
    typed on the command line ({field name: value}); checked whatever their source (Configs.check)."""
    values = {name: {key: value for recipe in recipes for key, value in recipe.get(name, {}).items()}
              for name in CONFIG_CLASSES}
    for name, value in typed.items():
        config, parse = FIELDS[name][0], cli_parameter(FIELDS[name][1]).parse
        values[config][name] = parse(value) if parse else value
    data = values["data"]
    if "name" not in data or "data_path" not in data:
        raise UcadError("the 'dataset NAME DATA_PATH' sub-command is missing (e.g. ... dataset mvtec /data/mvtec)")
    if not isinstance(data["name"], str) or data["name"] not in LAYOUTS:  # layouts register at run time
        raise UcadError(f"dataset NAME '{data['name']}' is not one of {', '.join(LAYOUTS)}")
    configs = Configs(**{name: cls(**values[name]) for name, cls in CONFIG_CLASSES.items()})
    configs.check()
    return configs


def typed_values(values: dict) -> dict:
    """The entries of `values` that the current command's command line (or environment) set: a default that click
    filled in must not hide the value of a --config file."""
    context = click.get_current_context()
    return {name: value for name, value in values.items()
            if context.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}


def read_recipe(path: str) -> dict[str, dict]:
    """{section: {field: value}} from a --config file in the layout of a run's config.json (a recipe may name a few
    options only). A key that names no option is an error, or a note when another version of ucad wrote the file;
    PatchCore's options, which older runs recorded, are passed over."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as error:
        raise UcadError(f"--config '{path}': cannot read it ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise UcadError(f"--config '{path}': not JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(data, dict):
        raise UcadError(f"--config '{path}': expected a JSON object with the parts {', '.join(CONFIG_CLASSES)}")
    sections, unknown = {}, []
    for key, value in data.items():
        if key in CONFIG_CLASSES and isinstance(value, dict):
            names = {f.name for f in fields(CONFIG_CLASSES[key])}
            unknown += [f"{key}.{name}" for name in value if name not in names and name not in PATCHCORE_ONLY]
            # checked here as well as in Configs.check, so that a wrong value names its file and key
            sections[key] = {name: checked_value(FIELDS[name][1], v, f"--config '{path}': {key}.{name}")
                             for name, v in value.items() if name in names}
        elif key not in RUN_RECORD_KEYS:
            unknown.append(key)
    version = data.get("version")
    if unknown and version not in (None, __version__):
        click.echo(f"note: --config '{path}' was written by ucad {version}; not used: {', '.join(unknown)}", err=True)
    elif unknown:
        raise UcadError(f"--config '{path}': '{unknown[0]}' is not an option; the file's parts are "
                        f"{', '.join(CONFIG_CLASSES)}, each holding options by field name, as in a run's config.json")
    return sections


@contextmanager
def one_line_errors(interrupted: str):
    """A problem the user can fix ends the command with one line and status 2, Ctrl-C with one line and status 130
    (what shells report for a program ended by Ctrl-C): RunInterrupted's message, else `interrupted`; no traceback."""
    try:
        yield
    except UcadError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    except (RunInterrupted, KeyboardInterrupt) as error:
        click.echo(str(error) if isinstance(error, RunInterrupted) else interrupted, err=True)
        sys.exit(130)
