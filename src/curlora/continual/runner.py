"""The continual-learning benchmark's controller: tasks in sequence, every method, honest metrics.

For each method, rank, learning rate and seed (:mod:`.plan`), a run adapts a fresh copy of the base
model and learns the tasks in order, scored after each one (:mod:`.loop`), checkpointed so that a
killed run resumes where it stopped (:mod:`.checkpoints`). The runner only orchestrates: it checks the
run directory, has an executor (:mod:`.executors`: this machine or a Ray cluster) load the base model
and train the runs, saves each result as it comes back (:mod:`.rundir`), then the confirming seeds at
the rates the grid chose, and collects and writes the results (:mod:`.results`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from curlora.continual.config import ContinualConfig
from curlora.continual.executors import Executor, executor_for, failure_text
from curlora.continual.parallel import DataParallel
from curlora.continual.plan import RunSpec, confirming, missing, run_specs
from curlora.continual.prepare import Base, Prepared
from curlora.continual.results import collect_results, write_results
from curlora.continual.rundir import RunDir
from curlora.continual.worker import Job, Worker


class ContinualRunner:
    """Runs every RunSpec of a config into ``run_dir``; finished work is never redone."""

    def __init__(self, config: ContinualConfig, run_dir: str | Path, resume: bool = False,
                 reuse_from: str | Path | None = None, report_only: bool = False) -> None:
        self.config = config
        # Under torchrun every process trains its share of each batch; only rank 0 writes files.
        parallel = DataParallel.join(config.device)
        if parallel.world > 1 and ((config.workers or 1) > 1 or config.executor != "local"):
            chosen = f"executor={config.executor}" if config.executor != "local" else f"workers={config.workers}"
            raise ValueError(f"{chosen} cannot combine with data parallel ({parallel.world} processes): use one.")
        self.run_dir = RunDir(run_dir, parallel)
        # An interim report of a long experiment: its finished runs reported, none trained.
        self.report_only = report_only
        if report_only and reuse_from is not None:
            raise ValueError("--report-only trains nothing and takes no runs from elsewhere: drop --reuse-runs-from.")
        if report_only and not (self.run_dir.path / "config.yaml").is_file():
            raise FileNotFoundError(f"--report-only reports the finished runs of an existing run directory; "
                                    f"{self.run_dir.path} holds no curlora run (no config.yaml).")
        self.run_dir.check(config, resume or report_only)  # reads only: a refused command changes nothing
        # Finished runs of another experiment with the same settings, taken as this one's (read and checked now).
        self.reused: dict[str, dict[str, Any]] = {}
        if reuse_from is not None:
            donor = RunDir(reuse_from, parallel)
            if donor.path.resolve() == self.run_dir.path.resolve():
                raise ValueError(f"--reuse-runs-from names the --output-dir itself ({donor.path}); name another "
                                 f"experiment's run directory.")
            keys = {spec.key for spec in run_specs(config)} - self.run_dir.finished()
            self.reused = donor.reusable(config, keys)
        self.job = Job(config, str(self.run_dir.path.resolve()), os.getcwd())

    @property
    def prepared(self) -> Prepared:
        """The model, data and protocol of this command, as a worker in this process prepares them (a
        program that inspects what the runs trained on; loaded again once run() has ended)."""
        return Worker.for_job(self.job).prepared

    def run(self) -> dict[str, Any] | None:
        """Every run of the config; the results (None on processes other than rank 0)."""
        try:
            return self._run_locked()
        finally:  # the lock goes with the command, and with this call when a program makes several
            self.run_dir.unlock()

    def _run_locked(self) -> dict[str, Any] | None:
        cfg, run_dir = self.config, self.run_dir
        if run_dir.path.is_dir():  # a resumed run: refuse at once if another command is on it
            run_dir.lock()
        if self.report_only:
            return self._report_finished()
        pending = missing(run_specs(cfg), run_dir.finished() | set(self.reused))
        with executor_for(cfg) as executor:
            # The model and the data are loaded and checked (nothing is written) before the directory is made.
            base = executor.base(self.job, self._base_seeds(pending))
            run_dir.create(cfg)
            run_dir.lock()
            run_dir.save_base_perplexity(base.ppl_before)
            for key, result in self.reused.items():
                run_dir.save_result(key, result)
            if self.reused:
                run_dir.parallel.say(f"reused {len(self.reused)} finished runs of another experiment: "
                                     f"{', '.join(self.reused)}")
            for task in base.described["tasks"]:
                run_dir.parallel.say(f"task {task['name']}: train {task['n_train']}, validation "
                                     f"{task['n_validation']}, eval {task['n_eval']}, majority-class accuracy "
                                     f"{task['majority_accuracy']:.3f}")
            self._train(executor, pending, base)
            specs = self.experiment()  # with confirm_seeds, the finished grid says which confirming runs are due
            if cfg.confirm_seeds:
                self._train(executor, missing(specs, run_dir.finished()), base)
        return self._write(specs, base)

    def _report_finished(self) -> dict[str, Any] | None:
        """results.json and the report of the runs finished so far, marked interim while any of the
        experiment's runs is missing (its confirming runs: those the finished grid chooses)."""
        with executor_for(self.config) as executor:
            base = executor.base(self.job, [])  # the model and the data, checked as for training
        finished = self.run_dir.finished()
        specs = self.experiment()
        interim = {"finished": sum(spec.key in finished for spec in specs),
                   "missing": [spec.key for spec in specs if spec.key not in finished]}
        return self._write([spec for spec in specs if spec.key in finished], base,
                           interim if interim["missing"] else None)

    def _write(self, specs: list[RunSpec], base: Base, interim: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The results of ``specs`` (finished runs) written with their report; None on processes other than rank 0."""
        run_dir = self.run_dir
        if not run_dir.parallel.is_main:
            return None
        runs = [{**run, **spec.order_fields} for spec, run in
                zip(specs, run_dir.read_results([spec.key for spec in specs], len(base.described["tasks"])))]
        results = collect_results(self.config, base.described, runs)
        if interim is not None:
            results["interim"] = interim
        write_results(results, run_dir.path)
        return results

    def _base_seeds(self, pending: list[RunSpec]) -> list[int]:
        """The seeds whose before-training rows the runs still to train need."""
        seeds = [spec.seed for spec in pending]
        if self.config.confirm_seeds and pending:  # which confirming runs are due is known once the grid is complete
            seeds += self.config.confirm_seeds
        elif self.config.confirm_seeds:
            seeds += [spec.seed for spec in missing(self.experiment(), self.run_dir.finished())]
        return list(dict.fromkeys(seeds))

    def _train(self, executor: Executor, specs: list[RunSpec], base: Base) -> None:
        """Every run of ``specs`` trained, each result saved as it comes back."""
        failures = executor.run(self.job, specs, base, lambda spec, result: self.run_dir.save_result(spec.key, result))
        if failures:  # an OSError, so the command prints it as one line
            raise ChildProcessError(failure_text(failures, self.run_dir.runs))

    def experiment(self) -> list[RunSpec]:
        """Every run of the experiment: the grid over ``seeds`` and, with ``confirm_seeds``, those seeds at
        the rates the grid's finished runs chose on validation."""
        if not self.config.confirm_seeds:
            return run_specs(self.config)
        finished = self.run_dir.finished()
        grid = [spec.key for spec in run_specs(self.config) if spec.key in finished]
        tasks = len(self.config.tasks) + len(self.config.task_files)
        return confirming(self.config, self.run_dir.read_results(grid, tasks))
