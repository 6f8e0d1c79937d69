"""Runs a user can watch: ``log_dir`` writes TensorBoard events that hold what results.json holds."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import kill_after_first_task, save_tiny_llama
from test_continual import tiny_config

from curlora.cli import main
from curlora.continual import ContinualRunner, run_specs
from curlora.continual.config import ContinualConfig
from curlora.continual.metrics import final_accuracy

EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer)


def _scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _check_events_match(results: dict, config: ContinualConfig) -> None:
    """Every run's events hold its step losses, accuracy matrix, scored perplexities and final ACC."""
    tasks = [t["name"] for t in results["tasks"]]
    log_dir = Path(config.log_dir)
    assert sorted(p.name for p in log_dir.iterdir()) == sorted(spec.key for spec in run_specs(config))
    for spec, run in zip(run_specs(config), results["runs"]):
        scalars = _scalars(log_dir / spec.key)
        step = 0
        for task, losses in zip(tasks, run["train_loss"]):
            logged = scalars.pop(f"train_loss/{task}", [])
            assert [s for s, _ in logged] == list(range(step + 1, step + len(losses) + 1))  # across tasks
            assert [v for _, v in logged] == pytest.approx(losses, rel=1e-6)  # float32 in the events
            step += len(losses)
        for j, task in enumerate(tasks):
            expected = [(i, row[j]) for i, row in enumerate(run["accuracy_matrix"]) if row[j] is not None]
            logged = scalars.pop(f"accuracy/{task}")
            assert [s for s, _ in logged] == [i for i, _ in expected]
            assert [v for _, v in logged] == pytest.approx([a for _, a in expected], rel=1e-6)
        ppl = run["perplexity"]
        expected = [(0, ppl["before"])] + [(i + 1, p) for i, p in enumerate(ppl["after_task"]) if p is not None]
        assert scalars.pop("perplexity") == [(s, pytest.approx(p, rel=1e-6)) for s, p in expected]
        assert scalars.pop("ACC") == [(len(tasks), pytest.approx(final_accuracy(run["accuracy_matrix"]), rel=1e-6))]
        assert not scalars, f"unexpected tags {sorted(scalars)}"


def test_events_hold_the_runs_step_losses_accuracies_perplexity_and_acc(tmp_path, tiny_model_dir, data_dir):
    """Written by the pool's worker processes, each run into its own directory (the resume test below
    logs in this process)."""
    config = tiny_config(tiny_model_dir, data_dir, methods=["curlora", "head"], log_dir=str(tmp_path / "tb"),
                         workers=2)
    results = ContinualRunner(config, tmp_path / "run").run()
    assert all(run["status"] == "ok" and any(run["train_loss"]) for run in results["runs"])
    _check_events_match(results, config)


def test_a_resumed_run_logs_each_step_once(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """The killed attempt's events are superseded: the resumed run's log equals its results."""
    config = tiny_config(tiny_model_dir, data_dir, methods=["curlora"], log_dir=str(tmp_path / "tb"))
    kill_after_first_task(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        ContinualRunner(config, tmp_path / "run").run()
    assert _scalars(tmp_path / "tb" / run_specs(config)[0].key)["train_loss/sst2"]  # the first attempt logged live
    results = ContinualRunner(config, tmp_path / "run", resume=True).run()
    _check_events_match(results, config)


def test_log_dir_is_a_runtime_setting_and_a_cli_flag(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """--log-dir reaches the config; adding it to a finished run's --resume is allowed (it changes no number)."""
    seen = []
    monkeypatch.setattr(ContinualRunner, "run", lambda self: seen.append(self.config.log_dir))
    main(["continual", "--model", tiny_model_dir, "--data-dir", str(data_dir), "--log-dir", str(tmp_path / "tb"),
          "--output-dir", str(tmp_path / "run")])
    assert seen == [str(tmp_path / "tb")]
    monkeypatch.undo()
    config = tiny_config(tiny_model_dir, data_dir, methods=["head"])
    ContinualRunner(config, tmp_path / "run2").run()
    ContinualRunner(tiny_config(tiny_model_dir, data_dir, methods=["head"], log_dir=str(tmp_path / "tb")),
                    tmp_path / "run2", resume=True)
    with pytest.raises(ValueError, match="log_dir"):
        tiny_config(tiny_model_dir, data_dir, log_dir=str(tmp_path / "run2" / "config.yaml"))


def test_without_log_dir_tensorboard_is_never_imported():
    script = ("import sys; import curlora.cli, curlora.continual.runner; "
              "print('tensorboard' in sys.modules or 'torch.utils.tensorboard' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False"
