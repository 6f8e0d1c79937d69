"""``executor: ray`` on a real Ray cluster started by this module, no mocks: a head node without CPUs
(as on KubeRay) and two one-CPU nodes, all on this machine (Ray's own ``ray.cluster_utils.Cluster``,
whose processes are this process's children and end with it). Every command connects to it by
address, as a sweep on a real cluster does. Token authentication is on, with a token of the module's
own in the environment (nothing is written to ~/.ray).

The sweep is the one-process sweep of test_continual (CURLoRA at two rates and the head floor on a tiny
random Llama): under Ray it ends on that sweep's numbers, also when the node training a run dies halfway
or when the driver is killed and the command rerun with --resume.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import free_port, save_tiny_llama
from test_continual import tiny_config

from curlora.continual import ContinualRunner
from curlora.continual.executors import ray as ray_executor
from curlora.continual.config import ContinualConfig

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="ray is not installed: pip install 'curlora[ray]'")
SWEEP = {"methods": ["curlora", "head"], "lrs": [1e-2, 3e-3]}
KEYS = ["curlora_r4_lr0.01_s0", "curlora_r4_lr0.003_s0", "head_s0"]


@pytest.fixture(scope="module", autouse=True)
def ray_token():
    """Every test of this module under one Ray token of its own (nothing written to ~/.ray). Ray reads
    its authentication settings when it is first imported, so no test may import it before this."""
    assert "ray" not in sys.modules, "ray was imported before its token was set: import it in a test, not at module level"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "token")
        env.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
        env.delenv("RAY_ADDRESS", raising=False)
        yield


@pytest.fixture(scope="module")
def cluster():
    """The module's Ray cluster; its nodes (all but the head) can be killed by a test."""
    from ray.cluster_utils import Cluster

    started = Cluster()  # its processes are stopped at its shutdown, or when this process ends
    try:
        # A dead node is noticed within about a second (by default: after 5 missed checks 3 s apart).
        health = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                  "health_check_failure_threshold": 2}
        started.add_node(num_cpus=0, include_dashboard=False, _system_config=health)
        for _ in range(2):
            started.add_node(num_cpus=1)
        started.wait_for_nodes()
        yield started
    finally:
        started.shutdown()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer)


@pytest.fixture(scope="module")
def config(tiny_model_dir, data_dir):
    return tiny_config(tiny_model_dir, data_dir, **SWEEP)


@pytest.fixture(scope="module")
def one_process(config, tmp_path_factory):
    """The sweep's numbers from one process, by run key."""
    results = ContinualRunner(config, tmp_path_factory.mktemp("alone")).run()
    return dict(zip(KEYS, _numbers(results)))


def _numbers(results: dict) -> list[dict]:
    """What each run measured (not how long it took, nor how many threads it had)."""
    return [{k: v for k, v in run.items() if k not in ("wall_time_s", "peak_memory_mb", "threads")}
            for run in results["runs"]]


def _on_ray(config, cluster, **changes):
    return dataclasses.replace(config, executor="ray", ray_address=cluster.address, **changes)


def _processes(title: str) -> list[int]:
    """This process's descendants (the module's cluster) whose title starts with ``title``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if command.startswith(title) and os.getpid() in _ancestors(int(entry)):
            found.append(int(entry))
    return found


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
        chain.append(pid)
    return chain


def _inodes(run_dir: Path) -> dict[str, int]:
    """Each result and checkpoint state file by path: a file written again is a new inode (atomic writes)."""
    return {str(p.relative_to(run_dir)): p.stat().st_ino
            for pattern in ("runs/*.json", "checkpoints/*/task*.json") for p in run_dir.glob(pattern)}


class Watch(threading.Thread):
    """Polls a run directory while a command trains: every inode each result file had; and, the first
    time ``ready(run_dir)`` holds once the run ``key`` has a worker process, freezes that process at
    once (SIGSTOP: the run stops where it is, as on a node that hangs) and calls ``then(pid)``."""

    def __init__(self, run_dir: Path, key: str, ready, then) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.key, self.ready, self.then = run_dir, key, ready, then
        self.seen: dict[str, set[int]] = {}
        self.frozen: dict | None = None  # the run directory's files when the run was frozen
        self.pid: int | None = None  # the frozen process
        self.stop = threading.Event()

    def run(self) -> None:
        pid, polls = None, 0
        while not self.stop.is_set():
            for path in (self.run_dir / "runs").glob("*.json"):
                try:
                    self.seen.setdefault(path.name, set()).add(path.stat().st_ino)
                except FileNotFoundError:
                    pass
            if pid is None and polls % 10 == 0:
                pid = next(iter(_processes(f"ray::{self.key}")), None)
            if pid is not None and self.frozen is None and self.ready(self.run_dir):
                os.kill(pid, signal.SIGSTOP)
                self.pid, self.frozen = pid, _inodes(self.run_dir)
                self.then(pid)
            polls += 1
            time.sleep(0.005)


@pytest.mark.parametrize("settings, message", [
    ({"executor": "dask"}, "Unknown executor 'dask'; choose one of ('local', 'ray')"),
    ({"ray_num_gpus": 1}, "ray_num_gpus set the Ray executor's runs; add executor: ray (--executor ray)"),
    ({"executor": "ray", "ray_num_cpus": 0}, "ray_num_cpus must be a finite number > 0"),
    ({"executor": "ray", "ray_max_retries": -2}, "ray_max_retries must be at least -1"),
    ({"executor": "ray", "ray_address": " "}, "ray_address must be 'auto' or HOST:PORT"),
    ({"executor": "ray", "device": "cuda:1", "ray_num_gpus": 1}, "each run trains on the GPU Ray gives it; use device cuda"),
    ({"executor": "ray", "device": "cuda"}, "set ray_num_gpus (--ray-num-gpus 1)"),
    ({"executor": "ray", "ray_num_gpus": 1}, "set device cuda (--device cuda) or drop ray_num_gpus"),
    ({"workers": 0}, "workers must be at least 1"),
])
def test_executor_settings_are_refused_before_any_work(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ContinualConfig(**settings)


def test_a_gpu_sweep_is_driven_from_a_machine_without_a_gpu():
    """The runs train on the cluster's GPUs: this machine need not have one (the driver loads no model)."""
    config = ContinualConfig(executor="ray", device="cuda", ray_num_gpus=1, workers=8)
    assert (config.device, config.ray_num_gpus, config.workers) == ("cuda", 1, 8)


def test_an_unreachable_cluster_is_named_before_anything_is_written(config, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match=f"ray_address '{address}'.*--ray-address"):
        ContinualRunner(dataclasses.replace(config, executor="ray", ray_address=address), tmp_path / "run").run()
    assert not (tmp_path / "run").exists()


def test_a_node_that_does_not_see_the_run_directory_says_why(tmp_path):
    assert "No such file" in ray_executor.unseen(str(tmp_path), "token")
    (tmp_path / ray_executor.TOKEN).write_text("another")
    assert "another command's token" in ray_executor.unseen(str(tmp_path), "token")
    (tmp_path / ray_executor.TOKEN).write_text("token")
    assert ray_executor.unseen(str(tmp_path), "token") is None
    assert list(tmp_path.iterdir()) == [tmp_path / ray_executor.TOKEN]  # the write check left nothing


def test_a_killed_driver_resumes_training_only_what_was_missing(cluster, config, one_process, tmp_path):
    run_dir, first, second = tmp_path / "run", *KEYS[:2]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    # One run at a time: the first finishes, the second is killed after its first task.
    driver = subprocess.Popen(
        [sys.executable, "-m", "curlora.cli", "continual", "--config", str(tmp_path / "config.yaml"),
         "--executor", "ray", "--ray-address", cluster.address, "--workers", "1", "--output-dir", str(run_dir)],
        stdout=(tmp_path / "driver.log").open("wb"), stderr=subprocess.STDOUT)
    watch = Watch(run_dir, second, lambda d: (d / "runs" / f"{first}.json").is_file()
                  and (d / "checkpoints" / second / "task1.json").is_file(),
                  lambda pid: driver.send_signal(signal.SIGKILL))
    watch.start()
    try:
        assert driver.wait(timeout=900) == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-3000:]
        deadline = time.monotonic() + 60
        while _processes(f"ray::{second}") and time.monotonic() < deadline:  # Ray ends a dead driver's tasks
            time.sleep(0.1)
        assert not _processes(f"ray::{second}")
    finally:
        watch.stop.set()
        watch.join()
        driver.kill()
        if watch.pid in _processes(f"ray::{second}"):  # a frozen process no one else would end
            os.kill(watch.pid, signal.SIGKILL)
    killed = watch.frozen
    assert _inodes(run_dir) == killed, "a task of the killed driver went on writing"
    assert f"checkpoints/{second}/task2.json" not in killed

    results = ContinualRunner(_on_ray(config, cluster), run_dir, resume=True).run()
    assert dict(zip(KEYS, _numbers(results))) == one_process
    after = _inodes(run_dir)
    # The finished run and the second run's finished task were not trained (nor written) again.
    assert {path: after[path] for path in killed} == killed
    assert set(after) - set(killed) == {f"runs/{second}.json", f"checkpoints/{second}/task2.json",
                                        "runs/head_s0.json", "checkpoints/head_s0/task1.json",
                                        "checkpoints/head_s0/task2.json"}


def test_a_run_whose_node_dies_is_retried_from_its_last_task(cluster, config, one_process, tmp_path):
    """Last in this module: it leaves the cluster one node short."""
    victim = KEYS[0]

    def kill_its_node(worker: int) -> None:
        (node,) = [n for n in cluster.worker_nodes if n.all_processes["raylet"][0].process.pid in _ancestors(worker)]
        cluster.remove_node(node, allow_graceful=False)
        os.kill(worker, signal.SIGKILL)  # the node's processes all end; a frozen one cannot see its raylet go

    watch = Watch(tmp_path, victim, lambda d: (d / "checkpoints" / victim / "task1.json").is_file(), kill_its_node)
    watch.start()
    try:
        results = ContinualRunner(_on_ray(config, cluster), tmp_path).run()
    finally:
        watch.stop.set()
        watch.join()
    assert watch.frozen is not None and f"checkpoints/{victim}/task2.json" not in watch.frozen
    assert len(cluster.worker_nodes) == 1
    # The numbers of one process (the runs the node's death did not touch, and the retried one).
    assert dict(zip(KEYS, _numbers(results))) == one_process
    assert {run["threads"] for run in results["runs"]} == {1}  # ray_num_cpus
    assert results["config"]["executor"] == "ray" and not (tmp_path / ray_executor.TOKEN).exists()
    # Its first task was not trained again (its state file is the one written before the node died) ...
    task1 = f"checkpoints/{victim}/task1.json"
    assert _inodes(tmp_path)[task1] == watch.frozen[task1]
    # ... and every run's result was written once, none lost.
    assert {name: len(inodes) for name, inodes in watch.seen.items()} == {f"{key}.json": 1 for key in KEYS}
