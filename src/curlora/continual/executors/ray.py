"""``executor: ray`` (``pip install 'curlora[ray]'``): each pending run a Ray task on a cluster. A run
does the same work wherever it trains, so its numbers do not depend on the executor (tested).

Under Ray one run is one Ray *task*, not a Ray Tune trial. The grid, the choice of each method's rate
on validation and the report already live in curlora, and a run has nothing for Tune to act on before
it ends (stopping some runs early would compare methods unequally), so Tune would add only a second copy
of the grid and result directories of its own. A task is exactly the unit that must be retried: one
run, with its resources (``ray_num_cpus``, ``ray_num_gpus``) and Ray's retries (``ray_max_retries``).
When its worker process or node dies, Ray starts it again and the run resumes from its last finished
task's checkpoint, ending on the numbers it would have had.

The run directory stays the one truth, so it must be on a filesystem every node mounts at the same path
(NFS, Lustre, a Kubernetes volume): a run's checkpoints are written by the node that trains it, where a
retried task on another node finds them. Each finished run's result comes back to this process (the
driver), which writes ``runs/<key>.json``, holds the directory's lock, and first checks that every node
that can take a run sees the directory (it reads a token the driver wrote there). The driver never loads
the model: ``base`` runs as a task with a run's resources too, so a head node without a GPU drives a GPU
sweep.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from curlora.continual.config import ContinualConfig
from curlora.continual.executors.common import OnResult, longest_first
from curlora.continual.plan import RunSpec
from curlora.continual.prepare import Base
from curlora.continual.worker import Job, Worker
from curlora.fileio import atomic_write_text

#: The file a command under Ray writes in its run directory for the nodes to find (removed at its end).
TOKEN = ".ray-token"


def _node() -> str:
    import ray

    return ray.util.get_node_ip_address()


def unseen(run_dir: str, token: str) -> str | None:
    """Why this node cannot work in the driver's run directory (it must read the token the driver wrote
    there, and write beside it), or None if it can."""
    try:
        if (Path(run_dir) / TOKEN).read_text() != token:
            return "it holds another command's token there (a copy of the directory, not the same one)"
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".ray-probe-"):
            pass
    except OSError as error:
        return f"{error.strerror or error} ({error.filename or run_dir})"
    return None


def _ray_probe(run_dir: str, token: str) -> str | None:
    problem = unseen(run_dir, token)
    return None if problem is None else f"node {_node()}: {problem}"


def _ray_base(job: Job, seeds: list[int]) -> Base:
    return Worker.for_job(job).base(seeds)


def _ray_run(job: Job, spec: RunSpec, base: Base, token: str) -> dict[str, Any]:
    problem = unseen(job.run_dir, token)
    if problem is not None:  # e.g. a node that joined the cluster after the driver's check
        raise FileNotFoundError(f"Ray node {_node()} cannot work in the run directory {job.run_dir}: {problem}. "
                                f"Mount it on every node at the same path (docs/distributed.md).")
    return Worker.for_job(job).train(spec, base)


def _answers(address: str, timeout_s: float = 10.0) -> None:
    """ConnectionError unless HOST:PORT accepts a connection: Ray itself retries an address nobody
    listens on for minutes before it gives up."""
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():  # "auto", or a form Ray resolves itself
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise ConnectionError(f"nothing answers at {host}:{port}: {error.strerror or error}") from None


def _causes(error: BaseException) -> list[BaseException]:
    """An exception and every exception it was raised from or during."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def ray_threads(config: ContinualConfig) -> int:
    """A run's torch threads under Ray: the CPUs Ray gives it."""
    return max(1, int(config.ray_num_cpus))


class RayExecutor:
    """Each pending run a Ray task on the cluster at ``ray_address`` (None: ``RAY_ADDRESS`` if set, else a
    Ray instance on this machine, started for the command and stopped at its end; a program that has
    called ``ray.init`` itself has its session used)."""

    def __init__(self, config: ContinualConfig) -> None:
        import ray  # the config checked that it is installed

        self.config = config
        self.ray = ray
        self.connected = False  # this command connected (or started an instance), so it disconnects
        self.started_here = False

    # the cluster ---------------------------------------------------------------------------------------
    def __enter__(self) -> RayExecutor:
        ray = self.ray
        if not ray.is_initialized():
            address = self.config.ray_address or os.environ.get("RAY_ADDRESS")
            named = (f"ray_address {address!r}" if self.config.ray_address else f"RAY_ADDRESS={address!r}")
            try:
                if address:
                    _answers(address)
                    ray.init(address=address)
                else:
                    ray.init(address="local", include_dashboard=False)
            except (ConnectionError, RuntimeError, ValueError) as error:
                if not address:
                    raise
                # Ray names a refused token only in the text of the error it raised from.
                if any("InvalidAuthToken" in str(e) for e in _causes(error)):
                    raise ConnectionError(
                        f"{named}: the Ray cluster refused this command's authentication token. Give the command "
                        f"the cluster's token: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (`ray get-auth-token` on "
                        f"its head node prints it) or the same ~/.ray/auth_token (docs/distributed.md).") from None
                raise ConnectionError(f"{named}: no Ray cluster answered ({error}). Start one (`ray start --head` "
                                      f"on its head node) or fix the address (--ray-address).") from None
            self.connected, self.started_here = True, not address
        return self

    def __exit__(self, *exc: object) -> None:
        if self.connected:  # a cluster's tasks of this command end with it
            self.ray.shutdown()

    def _resources(self) -> dict[str, Any]:
        cfg = self.config
        return {"num_cpus": cfg.ray_num_cpus, "num_gpus": cfg.ray_num_gpus, "max_retries": cfg.ray_max_retries}

    def _fitting_nodes(self) -> list[dict[str, Any]]:
        """The live nodes that have a run's resources."""
        cfg = self.config
        return [n for n in self.ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= cfg.ray_num_cpus
                and n["Resources"].get("GPU", 0) >= cfg.ray_num_gpus]

    def _check_fit(self) -> None:
        """Refused when no node has a run's resources and none can come (this command's own instance);
        else said (an autoscaling cluster adds nodes for the tasks that wait)."""
        if self._fitting_nodes():
            return
        cfg = self.config
        have = ", ".join(f"{n['NodeManagerAddress']}: {n['Resources'].get('CPU', 0):g} CPUs, "
                         f"{n['Resources'].get('GPU', 0):g} GPUs" for n in self.ray.nodes() if n["Alive"])
        wanted = f"ray_num_cpus={cfg.ray_num_cpus:g} and ray_num_gpus={cfg.ray_num_gpus:g}"
        if self.started_here:
            raise ValueError(f"No node of the Ray instance started on this machine ({have}) has a run's "
                             f"resources ({wanted}); lower them.")
        print(f"No Ray node has a run's resources now ({wanted}; {have}): the runs wait until one joins.",
              file=sys.stderr, flush=True)

    def _get(self, ref: Any) -> Any:
        """A task's value; a task's own error raised as itself (one line from the command)."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, Exception):
                raise error.cause from None
            raise

    # the runs ------------------------------------------------------------------------------------------
    def base(self, job: Job, seeds: Sequence[int]) -> Base:
        self._check_fit()
        task = self.ray.remote(**self._resources())(_ray_base)
        return self._get(task.remote(job.elsewhere(ray_threads(self.config)), list(seeds)))

    def _check_nodes_see(self, run_dir: Path, token: str) -> None:
        """Every node that can take a run reads the driver's token in ``run_dir`` and can write there."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = self.ray.remote(num_cpus=0, max_retries=0)(_ray_probe)
        nodes = self._fitting_nodes()
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(run_dir), token) for n in nodes]
        problems = []
        for node, ref in zip(nodes, refs):
            try:
                problem = self.ray.get(ref)
            except self.ray.exceptions.RayError as error:  # e.g. curlora not installed there
                problem = f"node {node['NodeManagerAddress']}: cannot run curlora's task ({str(error).strip().splitlines()[-1]})"
            if problem is not None:
                problems.append(problem)
        if problems:
            raise FileNotFoundError(
                f"The run directory {run_dir} is not shared with every Ray node that can take a run: "
                f"{'; '.join(problems)}. Put --output-dir on a filesystem every node mounts at the same path "
                f"(NFS, Lustre, a shared volume; docs/distributed.md), with curlora installed on every node."
            )

    def run(self, job: Job, specs: Sequence[RunSpec], base: Base, on_result: OnResult) -> list[str]:
        run_dir = Path(job.run_dir)
        token = secrets.token_hex(16)
        atomic_write_text(run_dir / TOKEN, token)
        try:
            self._check_nodes_see(run_dir, token)
            return self._run_tasks(job, specs, base, on_result, token) if specs else []
        finally:
            (run_dir / TOKEN).unlink(missing_ok=True)

    def _run_tasks(self, job: Job, pending: Sequence[RunSpec], base: Base, on_result: OnResult,
                   token: str) -> list[str]:
        """One task per run, at most ``workers`` at once if set; each result passed on as it comes back."""
        ray, cfg = self.ray, self.config
        task = ray.remote(**self._resources())(_ray_run)
        remote_job = job.elsewhere(ray_threads(cfg))
        base_ref = ray.put(base)
        queue = longest_first(pending, cfg)
        limit = cfg.workers or len(queue)
        cluster = ray.cluster_resources()
        print(f"{len(pending)} runs as Ray tasks on {len(self._fitting_nodes())} node(s) "
              f"({cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs), each with "
              f"{cfg.ray_num_cpus:g} CPU(s) and {ray_threads(cfg)} thread(s)"
              + (f", {cfg.ray_num_gpus:g} GPU(s)" if cfg.ray_num_gpus else "")
              + (f"; at most {cfg.workers} at once" if cfg.workers else ""), flush=True)
        in_flight: dict[Any, RunSpec] = {}
        failed: list[str] = []
        while queue or in_flight:
            while queue and len(in_flight) < limit:
                spec = queue.pop(0)
                in_flight[task.options(name=spec.key).remote(remote_job, spec, base_ref, token)] = spec
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            spec = in_flight.pop(ref)
            try:
                on_result(spec, ray.get(ref))
            except ray.exceptions.RayError as error:  # its own error, or its worker died more than allowed
                failed.append(spec.key)
                print(f"[{spec.key}] failed on Ray: {error}", file=sys.stderr, flush=True)
        return [f"{len(failed)} of {len(pending)} runs failed on Ray ({', '.join(failed)})"] if failed else []
