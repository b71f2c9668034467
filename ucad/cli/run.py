"""The chained command line: `run_ucad.py [global options] RESULTS_PATH ucad ... sampler ... dataset ...`.

Option names and defaults follow the released UCAD/PatchCore command line so published commands run as written.
Each option is a field of the typed configuration (ucad.config)."""
from __future__ import annotations

import click

from ucad.cli.options import build_configs, config_parameters, one_line_errors, read_recipe, typed_values
from ucad.runtime.errors import RunInterrupted, UcadError

COMMAND_ORDER = ("ucad", "sampler", "dataset")


@click.group(chain=True, invoke_without_command=True)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="Set every option from a JSON file in the layout of a run's config.json (a recipe in configs/, or "
                   "a run's own config.json to replay it); options typed on the command line win.")
@config_parameters("main")
def main(**kwargs):
    """UCAD: unsupervised continual anomaly detection with contrastively-learned prompts."""


def _sub_command(name: str, help: str) -> click.Command:
    @main.command(name, help=help)
    @config_parameters(name)
    def command(**kwargs):
        return name, typed_values(kwargs)
    return command


ucad_command = _sub_command("ucad", "The model: backbone, layers, patch features, scoring.")
sampler_command = _sub_command("sampler", "Coreset sampler for keys and knowledge.")
dataset_command = _sub_command("dataset", "Data: MVTec-layout folder or VisA, tasks in the order of -d.")


@main.result_callback()
def run(methods, config_file, **global_options):
    order = [name for name, _ in methods]
    with one_line_errors():
        if order != sorted(order, key=COMMAND_ORDER.index):
            raise UcadError(f"sub-commands must come in the order {', '.join(COMMAND_ORDER)} (got {', '.join(order)})")
        try:
            # every value is checked before torch loads: a bad one is one line, not a deep traceback or a nonsense run
            typed = typed_values(global_options)
            for _, values in methods:
                typed.update(values)
            configs = build_configs(typed, read_recipe(config_file) if config_file else None)
            from ucad.continual.experiment import run_experiment  # heavy imports only once the command line is valid

            run_experiment(configs)
        except KeyboardInterrupt:  # while importing torch: nothing was written yet
            raise RunInterrupted("interrupted before the run started; nothing was written") from None


if __name__ == "__main__":
    main()
