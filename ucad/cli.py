"""The chained command line: `run_ucad.py [global options] RESULTS_PATH ucad ... sampler ... dataset ...`.

Option names and defaults follow the released UCAD/PatchCore command line so published commands run
as written; options that are new here say so in their help. The options are not declared here: each is
a field of the typed configuration (ucad.config), whose metadata says which sub-command shows it.
"""
from __future__ import annotations

import sys
from dataclasses import fields

import click

from ucad.config import CONFIG_CLASSES, Configs, cli_parameter
from ucad.errors import RunInterrupted, UcadError

COMMAND_ORDER = ("ucad", "sampler", "dataset")
# the configuration a command is mostly about: its fields are listed first in --help
HOME_CONFIG = {"main": "run", "ucad": "model", "sampler": "learning", "dataset": "data"}


def _click_type(value):
    if isinstance(value, tuple):
        return click.Choice(value)
    if value == "path":
        return click.Path()
    if value == "folder":
        return click.Path(file_okay=False)
    return value


def config_parameters(command: str, only: tuple[str, ...] | None = None):
    """A decorator adding the click arguments and options of every configuration field shown by `command`
    (`only`: just these fields), in the order the fields are declared."""
    def decorate(function):
        classes = sorted(CONFIG_CLASSES, key=lambda name: name != HOME_CONFIG[command])
        chosen = [(config_field, parameter) for name in classes for config_field in fields(CONFIG_CLASSES[name])
                  if (parameter := cli_parameter(config_field)) is not None and parameter.command == command
                  and (only is None or config_field.name in only)]
        for config_field, parameter in reversed(chosen):  # click lists the last decorator first
            keywords = {k: _click_type(v) if k == "type" else v for k, v in parameter.click.items()}
            if parameter.is_argument:  # required once its sub-command is given (a left-out one keeps the default)
                function = click.argument(config_field.name, metavar=parameter.metavar, **keywords)(function)
                continue
            default = config_field.default
            if keywords.get("multiple") and not isinstance(default, tuple):
                default = (default,)  # -b: a multiple option in the released CLI, one value here
            flag = keywords.get("is_flag", False)
            function = click.option(*parameter.declarations, config_field.name, default=default,
                                    show_default=not flag and not keywords.get("hidden", False),
                                    help=parameter.help, **keywords)(function)
        return function
    return decorate


def build_configs(given: dict[str, dict]) -> Configs:
    """The four configurations from the values each command received (command name -> {field name: value});
    fields of a left-out sub-command keep their defaults."""
    built = {}
    for name, cls in CONFIG_CLASSES.items():
        values = {}
        for config_field in fields(cls):
            parameter = cli_parameter(config_field)
            if parameter is None or config_field.name not in given.get(parameter.command, {}):
                continue
            value = given[parameter.command][config_field.name]
            values[config_field.name] = parameter.parse(value) if parameter.parse else value
        built[name] = cls(**values)
    configs = Configs(**built)
    configs.check()
    return configs


@click.group(chain=True)
@config_parameters("main")
def main(**kwargs):
    """UCAD: unsupervised continual anomaly detection with contrastively-learned prompts."""


@main.command("ucad")
@config_parameters("ucad")
def ucad_command(**kwargs):
    """The model: backbone, layers, patch features, scoring."""
    return "ucad", kwargs


@main.command("sampler")
@config_parameters("sampler")
def sampler_command(**kwargs):
    """Coreset sampler for keys and knowledge."""
    return "sampler", kwargs


@main.command("dataset")
@config_parameters("dataset")
def dataset_command(**kwargs):
    """Data: MVTec-layout folder or VisA, tasks in the order of -d."""
    return "dataset", kwargs


@main.result_callback()
def run(methods, **global_options):
    order = [name for name, _ in methods]
    if "dataset" not in order:
        _fail("the 'dataset NAME DATA_PATH' sub-command is missing (e.g. ... dataset mvtec /data/mvtec)")
    if order != sorted(order, key=COMMAND_ORDER.index):
        _fail(f"sub-commands must come in the order {', '.join(COMMAND_ORDER)} (got {', '.join(order)})")
    try:
        # every value is checked before anything is loaded: a bad one is one line, not a traceback from deep
        # inside torch (or a silent nonsense run)
        configs = build_configs({"main": global_options, **dict(methods)})
        from ucad.experiment import run_experiment  # heavy imports only once the command line is valid

        run_experiment(configs)
    except UcadError as error:
        _fail(str(error))
    except RunInterrupted as interrupted:
        _interrupted(str(interrupted))
    except KeyboardInterrupt:  # while importing torch: nothing was written yet
        _interrupted("interrupted before the run started; nothing was written")


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _interrupted(message: str) -> None:
    click.echo(message, err=True)
    sys.exit(130)  # what shells report for a program ended by Ctrl-C


def entry() -> None:
    """Console entry point; user-fixable problems print one line, not a traceback."""
    try:
        main()
    except UcadError as error:
        _fail(str(error))


if __name__ == "__main__":
    entry()
