"""The plan of a command's runs: the grid of (method, rank, rate, λ, seed), the confirming seeds at
the rates the grid chose on validation, and which runs still lack a result. Pure functions: what is
finished comes in as arguments, so the plan reads no file."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from curlora.continual.config import ContinualConfig
from curlora.continual.frontier import chosen_rates, select_learning_rates


@dataclass(frozen=True)
class RunSpec:
    """One run: a method at one rank, rate and Eq. 11 λ, under one seed."""

    method: str
    rank: int | None
    lr: float | None
    u_penalty: float
    seed: int

    @property
    def label(self) -> str:
        """The method as reported: λ > 0 makes the paper's Eq. 11 objective a method of its own."""
        return f"{self.method}+eq11(λ={self.u_penalty:g})" if self.u_penalty else self.method

    @property
    def key(self) -> str:
        """The run's name in the run directory (``runs/<key>.json``, ``checkpoints/<key>``)."""
        parts = [self.method.replace(":", "-")]
        if self.rank is not None:
            parts.append(f"r{self.rank}")
        if self.lr is not None:
            parts.append(f"lr{self.lr:g}")
        if self.u_penalty:
            parts.append(f"lam{self.u_penalty:g}")
        return "_".join(parts + [f"s{self.seed}"])


def run_specs(config: ContinualConfig, chosen: Mapping[tuple, Any] | None = None) -> list[RunSpec]:
    """Every run of a config: each method at each of the sweep's values that apply to it, for each of
    ``seeds``; given ``chosen`` ((method label, rank) -> the rate validation chose among those runs),
    then each of ``confirm_seeds`` at the chosen rates only."""
    specs = []
    for seed in config.seeds:
        for name in config.methods:
            method = config.method(name)
            ranks = config.ranks if method.takes_rank else [None]
            penalties = config.u_penalties if method.takes_u_penalty else [0.0]
            for rank in ranks:
                for lr in config.rates_for(name, rank) if method.takes_lr else [None]:
                    for penalty in penalties:
                        specs.append(RunSpec(name, rank, lr, penalty, seed))
    if chosen is not None:
        grid = [spec for spec in specs if spec.seed == config.seeds[0]]
        specs += [dataclasses.replace(spec, seed=seed) for seed in config.confirm_seeds for spec in grid
                  if (spec.label, spec.rank) in chosen and chosen[(spec.label, spec.rank)] == spec.lr]
    return specs


def confirming(config: ContinualConfig, grid_runs: Sequence[Mapping[str, Any]]) -> list[RunSpec]:
    """Every run of the experiment: the grid over ``seeds``, then each of ``confirm_seeds`` at the rates
    ``grid_runs`` (the grid's finished results) chose on validation; a method none of whose runs
    finished has no confirming runs."""
    return run_specs(config, chosen_rates(select_learning_rates(list(grid_runs))))


def missing(specs: Sequence[RunSpec], finished: Collection[str]) -> list[RunSpec]:
    """The runs of ``specs`` whose key is not among ``finished`` (what --resume still trains)."""
    return [spec for spec in specs if spec.key not in finished]
