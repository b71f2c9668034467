"""The chained command line: `run_ucad.py [global options] RESULTS_PATH ucad ... sampler ... dataset ...`.

Option names and defaults follow the released UCAD/PatchCore command line so published commands run as written."""
from __future__ import annotations

import json

import click

from ucad.cli.options import PATCHCORE_ONLY, build_configs, config_parameters, one_line_errors, read_recipe, \
    typed_values
from ucad.runtime.errors import UcadError

COMMAND_ORDER = ("ucad", "sampler", "dataset")


@click.group(chain=True, invoke_without_command=True)
@click.option("--config", "config_files", multiple=True, type=click.Path(dir_okay=False),
              help="Set the options a JSON file names, in the layout of a run's config.json (a recipe in configs/, or "
                   "a run's own config.json to replay it); repeat it to layer files, a later one winning; options "
                   "typed on the command line win over every file.")
@click.option("--print_config", is_flag=True, help=(
    "Print the resolved configuration in the --config layout and exit, before any model or data is loaded."))
@config_parameters("main")
def main(**kwargs):
    """UCAD: unsupervised continual anomaly detection with contrastively-learned prompts."""


def _sub_command(name: str, help: str) -> click.Command:
    @main.command(name, help=help)
    @config_parameters(name)
    def command(**kwargs):
        if ignored := [f"--{option}" for option in PATCHCORE_ONLY if kwargs.pop(option, None)]:
            click.echo(f"note: {', '.join(ignored)} ignored: PatchCore options whose one behaviour is implemented "
                       "here (mean pooling, the maximum patch score, stride 1)", err=True)
        return name, typed_values(kwargs)
    return command


ucad_command = _sub_command("ucad", "The model: backbone, layers, patch features, scoring.")
for patchcore_option in PATCHCORE_ONLY:  # read so that PatchCore command lines run as written
    click.option(f"--{patchcore_option}", hidden=True, multiple=patchcore_option == "patchsize_aggregate")(ucad_command)
sampler_command = _sub_command("sampler", "Coreset sampler for keys and knowledge.")
dataset_command = _sub_command("dataset", "Data: MVTec-layout folder or VisA, tasks in the order of -d.")


@main.result_callback()
def run(methods, config_files, print_config, **global_options):
    order = [name for name, _ in methods]
    # a Ctrl-C that run_experiment does not report itself comes while torch is imported: nothing was written yet
    with one_line_errors("interrupted before the run started; nothing was written"):
        if order != sorted(order, key=COMMAND_ORDER.index):
            raise UcadError(f"sub-commands must come in the order {', '.join(COMMAND_ORDER)} (got {', '.join(order)})")
        # every value is checked before torch loads: a bad one is one line, not a deep traceback or a nonsense run
        typed = typed_values(global_options) | {name: value for _, values in methods for name, value in values.items()}
        configs = build_configs(typed, [read_recipe(path) for path in config_files])
        if print_config:
            click.echo(json.dumps(configs.as_dict(), indent=2))
            return
        from ucad.continual.experiment import run_experiment  # heavy imports only once the command line is valid
        run_experiment(configs)


if __name__ == "__main__":
    main()
