"""What a continual run tells its observers: the console report (ucad.continual.console), the run folder's files
(ucad.continual.outputs) and instruments such as benchmarks/benchmark.py; none of them needs the loop's internals."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ucad.continual.experiment import ContinualRun


class RunHooks:
    """The points of a run, in their order; each does nothing here. `run` holds the state (model, records, run
    folder); `index` is the task's place in run.tasks."""

    def run_started(self, run: ContinualRun) -> None:
        """Set up, with a resumed run's finished tasks restored; nothing learned yet."""

    def task_started(self, run: ContinualRun, index: int) -> None:
        """Task `index` is about to be learned (a resumed run's finished tasks are not learned again)."""

    def task_learned(self, run: ContinualRun, index: int, seconds: float) -> None:
        """Task `index` was learned in `seconds`; it has its thresholds where images were held out."""

    def phase_evaluated(self, run: ContinualRun, index: int, seconds: float) -> None:
        """Every task seen so far was evaluated after task `index`, in `seconds`."""

    def phase_finished(self, run: ContinualRun, index: int) -> None:
        """The phase is to be kept: files are written here, and Ctrl-C waits until every observer is done."""

    def phase_kept(self, run: ContinualRun, index: int, seconds: float) -> None:
        """The phase is kept (written in `seconds`): a run stopped from now on continues with the next task."""

    def run_finished(self, run: ContinualRun) -> None:
        """Every task was learned and evaluated."""
