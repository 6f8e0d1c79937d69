"""The continual benchmark end to end on a tiny model and tiny slices of the real tasks."""

import copy
import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from conftest import free_port, kill_after_first_task, save_tiny_llama

from curlora.cli import main
from curlora.continual import ContinualRunner, run_specs
from curlora.continual.config import ContinualConfig, load_config
from curlora.continual.frontier import select_learning_rates
from curlora.continual.prepare import load_data
from curlora.continual.report import write_report


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer)


def tiny_config(model_dir, data_dir, **overrides):
    settings = dict(
        model=model_dir, tasks=["sst2", "mrpc"], corpus="wikitext2", data_dir=str(data_dir),
        methods=["curlora", "lora", "head"], ranks=[4], examples_per_task=24, eval_examples=20,
        batch_size=8, max_length=32, lr=1e-2, head_lr=1e-2, ppl_max_tokens=96, ppl_window=64,
        ppl_stride=32, progress=False,
    )
    settings.update(overrides)
    return ContinualConfig(**settings)


def _comparable(results):
    return [{k: v for k, v in run.items() if k not in ("wall_time_s", "peak_memory_mb")} for run in results["runs"]]


def test_tiny_end_to_end_writes_everything(tmp_path, tiny_model_dir, data_dir):
    results = ContinualRunner(tiny_config(tiny_model_dir, data_dir), tmp_path).run()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["schema_version"] == 1 and len(saved["runs"]) == 3
    assert saved["model"] == Path(tiny_model_dir).name  # the model's name, not a path of this machine
    for run in saved["runs"]:
        assert run["status"] == "ok"
        for key in ("accuracy_matrix", "validation_accuracy", "perplexity", "trainable_params", "diagnostics",
                    "wall_time_s", "peak_memory_mb", "final_train_loss"):
            assert key in run
        assert len(run["accuracy_matrix"]) == 3 and run["accuracy_matrix"][1][1] is None
    assert [t["name"] for t in saved["tasks"]] == ["sst2", "mrpc"]
    assert all(0 < t["majority_accuracy"] < 1 for t in saved["tasks"])
    by_method = {run["method"]: run for run in results["runs"]}
    head = by_method["head"]
    # A frozen backbone: the first task's accuracy cannot move when the second task trains.
    assert head["accuracy_matrix"][1][0] == head["accuracy_matrix"][2][0]
    assert head["trainable_params"]["adapter"] == 0
    curlora = by_method["curlora"]
    assert curlora["trainable_params"]["adapter"] == 2 * 3 * 16
    assert len(curlora["diagnostics"]) == 6 and curlora["diagnostics"][0]["u_norm"] > 0
    assert curlora["perplexity"]["final"] != curlora["perplexity"]["before"]
    assert results["summary"]
    report = (tmp_path / "report.md").read_text()
    assert "curlora" in report and "head" in report
    assert (tmp_path / "perplexity.png").is_file() and (tmp_path / "accuracy_matrix_curlora_r4.png").is_file()
    assert (tmp_path / "config.yaml").is_file()


@pytest.mark.parametrize("methods", [["curlora", "head"], ["curlora-bank"], ["lora+ewc"], ["curlora+replay"], ["o-lora"], ["lora-corda-kpm"]])
def test_killed_run_resumes_to_the_same_numbers(tmp_path, tiny_model_dir, data_dir, monkeypatch, methods):
    config = tiny_config(tiny_model_dir, data_dir, methods=methods, corda_samples=8, corda_sample_tokens=64)
    uninterrupted = ContinualRunner(config, tmp_path / "a").run()

    kill_after_first_task(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        ContinualRunner(config, tmp_path / "b").run()
    with pytest.raises(FileExistsError, match="--resume"):
        ContinualRunner(config, tmp_path / "b")
    resumed = ContinualRunner(config, tmp_path / "b", resume=True).run()
    assert _comparable(resumed) == _comparable(uninterrupted)


def test_bank_of_u_leaves_earlier_tasks_exactly_as_they_were(tmp_path, tiny_model_dir, data_dir):
    config = tiny_config(tiny_model_dir, data_dir, methods=["curlora", "curlora-bank"])
    runs = {run["method"]: run for run in ContinualRunner(config, tmp_path).run()["runs"]}
    bank, shared = runs["curlora-bank"], runs["curlora"]
    R = bank["accuracy_matrix"]
    assert R[1][0] == R[2][0]  # task 0 evaluated with its own U after task 1 trained U_1
    assert bank["validation_accuracy"][0] is not None
    assert bank["needs_task_identity"] and not shared["needs_task_identity"]
    assert bank["stored_per_task"] == bank["trainable_params"]["adapter"] == 2 * 3 * 16
    assert shared["stored_per_task"] == 0
    # The first task trained the same way in both (same seed, same C and R, U from zero).
    assert bank["accuracy_matrix"][1] == shared["accuracy_matrix"][1]
    assert "needs the task's identity at inference" in (tmp_path / "report.md").read_text()


def test_replay_buffer_holds_training_rows_only_and_replays_them_through_their_heads(tmp_path, tiny_model_dir,
                                                                                     data_dir, monkeypatch):
    from curlora.continual import training
    from curlora.data.splits import text_key

    config = tiny_config(tiny_model_dir, data_dir, methods=["curlora+replay"], replay_per_task=6)
    seen, heads_after = [], []
    original = training.train_task

    def spy(model, items, loss_fn, task_params, *args, **kwargs):
        current = max(j for _, j in items)
        heads = loss_fn.__self__.heads  # the run's HeadsRun
        seen.append(([e for e, j in items if j == current], [(e, heads[j]) for e, j in items if j != current],
                     heads[current]))
        assert [id(p) for p in task_params] == [id(p) for p in heads[current].parameters()]
        losses = original(model, items, loss_fn, task_params, *args, **kwargs)
        heads_after.append(copy.deepcopy(heads[current].state_dict()))
        return losses

    monkeypatch.setattr("curlora.continual.loop.train_task", spy)
    runner = ContinualRunner(config, tmp_path)
    results = runner.run()
    assert results["runs"][0]["status"] == "ok" and results["runs"][0]["rows_kept_per_task"] == 6
    (first_rows, first_replay, first_head), (_, second_replay, second_head) = seen
    assert first_replay == []
    assert len(second_replay) == 6 and all(h is first_head and h is not second_head for _, h in second_replay)
    held_out = {text_key(e) for e in [*runner.prepared.data.tasks[0].eval, *runner.prepared.data.validation[0]]}
    replayed = [e for e, _ in second_replay]
    assert all(e in first_rows for e in replayed)  # training rows of task 0 ...
    assert not {text_key(e) for e in replayed} & held_out  # ... never its validation or evaluation rows
    # Stratified: each label keeps its share of the task's training rows (largest remainder).
    shares = Counter(e.label for e in first_rows)
    exact = {label: 6 * count / len(first_rows) for label, count in shares.items()}
    counts = Counter(e.label for e in replayed)
    assert sum(counts.values()) == 6 and all(abs(counts[label] - exact[label]) < 1 for label in exact)
    # The old head scored its replayed rows but stayed exactly as its own task left it.
    assert all(torch.equal(first_head.state_dict()[k], heads_after[0][k]) for k in heads_after[0])
    assert "keeps 6 training rows of every task for replay" in (tmp_path / "report.md").read_text()


def test_resume_refuses_a_changed_config(tmp_path, tiny_model_dir, data_dir):
    config = tiny_config(tiny_model_dir, data_dir, methods=["head"])
    ContinualRunner(config, tmp_path).run_dir.create(config)
    with pytest.raises(ValueError, match="epochs"):
        ContinualRunner(tiny_config(tiny_model_dir, data_dir, methods=["head"], epochs=2), tmp_path, resume=True)


def test_a_directory_in_use_by_another_command_is_refused_before_any_work(tmp_path, tiny_model_dir, data_dir):
    import fcntl

    config = tiny_config(tiny_model_dir, data_dir, methods=["head"])
    ContinualRunner(config, tmp_path).run_dir.create(config)
    with open(tmp_path / ".lock", "a+") as other:  # another command holds the directory
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.truncate(0)  # as a command does: the lock file holds its holder's pid only
        other.write("4242")
        other.flush()
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
        with pytest.raises(FileExistsError, match="in use by a running curlora command \\(pid 4242\\)"):
            ContinualRunner(config, tmp_path, resume=True).run()
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # Once that command has ended (its lock went with it), the same command resumes.
    assert ContinualRunner(config, tmp_path, resume=True).run()["runs"][0]["status"] == "ok"


def test_diverging_method_fails_alone(tmp_path, tiny_model_dir, data_dir):
    config = tiny_config(tiny_model_dir, data_dir, methods=["curlora", "head"], lr=1e30, tasks=["sst2"])
    results = ContinualRunner(config, tmp_path).run()
    status = {run["method"]: run["status"] for run in results["runs"]}
    assert status == {"curlora": "failed", "head": "ok"}
    assert "lower the learning rate" in results["runs"][0]["error"]


def test_sweep_enumerates_methods_rates_and_penalties():
    config = ContinualConfig(methods=["curlora", "lora", "head"], ranks=[8, 16], lrs=[1e-3, 1e-2],
                             u_penalties=[0.0, 0.1], seeds=[0, 1])
    specs = run_specs(config)
    assert len(specs) == 2 * (2 * 2 * 2 + 2 * 2 + 1)
    assert len({s.key for s in specs}) == len(specs)
    # A method's own grid replaces the shared one for it alone.
    own = run_specs(ContinualConfig(methods=["curlora", "lora", "head"], lrs=[1e-3, 1e-2],
                                    method_lrs={"curlora": [1e-2, 3e-2, 1e-1]}))
    assert [(s.method, s.lr) for s in own] == [("curlora", 1e-2), ("curlora", 3e-2), ("curlora", 1e-1),
                                               ("lora", 1e-3), ("lora", 1e-2), ("head", None)]
    # Or one grid per rank: each rank at the rate it chose on validation, over more seeds.
    chosen = run_specs(ContinualConfig(methods=["curlora", "lora"], ranks=[8, 16], lrs=[1e-3], seeds=[1],
                                       method_lrs={"curlora": {8: [1e-2], 16: [3e-3]}}))
    assert [(s.method, s.rank, s.lr) for s in chosen] == [("curlora", 8, 1e-2), ("curlora", 16, 3e-3),
                                                          ("lora", 8, 1e-3), ("lora", 16, 1e-3)]
    # confirm_seeds: each (method label, rank) at the rate its grid chose; none for a method that chose none.
    config = ContinualConfig(methods=["curlora", "lora", "head"], ranks=[8, 16], lrs=[1e-3, 1e-2],
                             u_penalties=[0.0, 0.1], seeds=[0], confirm_seeds=[2, 1])
    assert run_specs(config) == run_specs(dataclasses.replace(config, confirm_seeds=[]))  # the grid alone
    chosen = {("curlora+eq11(λ=0.1)", 8): 1e-3, ("curlora", 8): 1e-2, ("curlora", 16): 1e-3, ("head", None): None}
    extra = run_specs(config, chosen)[len(run_specs(config)):]
    assert [(s.seed, s.label, s.rank, s.lr) for s in extra] == [
        (seed, label, rank, lr) for seed in (2, 1) for (label, rank), lr in chosen.items()]  # in the grid's order
    with pytest.raises(ValueError, match=r"seeds \[0, 1\] and confirm_seeds \[1, 2\] must name each seed once"):
        ContinualConfig(seeds=[0, 1], confirm_seeds=[1, 2])


def test_confirm_seeds_repeat_the_rate_the_grid_chose_on_validation(tmp_path, tiny_model_dir, data_dir):
    config = tiny_config(tiny_model_dir, data_dir, methods=["curlora", "head"], lrs=[1e-2, 1e-3], confirm_seeds=[1])
    results = ContinualRunner(config, tmp_path / "run").run()
    grid = [run for run in results["runs"] if run["seed"] == 0]
    (choice,) = [c["lr"] for c in select_learning_rates(grid) if c["method"] == "curlora"]
    assert [(r["method"], r["lr"], r["seed"]) for r in results["runs"]] == [
        ("curlora", 1e-2, 0), ("curlora", 1e-3, 0), ("head", None, 0), ("curlora", choice, 1), ("head", None, 1)]
    # The choice reads the grid's seed only: seed 1's run at the chosen rate does not move it.
    assert results["frontier"]["selection"] == select_learning_rates(grid)
    assert all(run["selected"] for run in results["runs"] if run["seed"] == 1)
    # A report written again from results.json chooses on the grid's seed too: seed 1 scoring 0 on
    # validation leaves the chosen rate's validation accuracy in its table as seed 0 had it.
    (score,) = [c["validation_accuracy"][choice] for c in select_learning_rates(grid) if c["method"] == "curlora"]
    assert score > 0
    changed = copy.deepcopy(results)
    for run in changed["runs"]:
        if run["seed"] == 1:
            run["validation_accuracy"] = [0.0] * len(run["validation_accuracy"])
    write_report(changed, tmp_path / "again")
    assert f"{choice:g}: {score:.3f}" in (tmp_path / "again" / "report.md").read_text()
    # One more rate on --resume: the grid's new run trains, then seed 1 at whatever the grid now chooses.
    wider = dataclasses.replace(config, lrs=[1e-2, 1e-3, 3e-2])
    resumed = ContinualRunner(wider, tmp_path / "run", resume=True).run()
    grid = [run for run in resumed["runs"] if run["seed"] == 0]
    (choice,) = [c["lr"] for c in select_learning_rates(grid) if c["method"] == "curlora"]
    assert [(r["method"], r["lr"], r["seed"]) for r in resumed["runs"]] == [
        ("curlora", 1e-2, 0), ("curlora", 1e-3, 0), ("curlora", 3e-2, 0), ("head", None, 0),
        ("curlora", choice, 1), ("head", None, 1)]
    unmarked = [[{k: v for k, v in run.items() if k != "selected"} for run in r["runs"][:2]] for r in (resumed, results)]
    assert unmarked[0] == unmarked[1]  # kept, not trained again


def test_presets_files_and_flags_layer(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 2\nranks: [8]\n")
    config = load_config("paper", path, {"epochs": 5, "lr": None})
    assert config.epochs == 5 and config.ranks == [8] and config.lr == 2.5e-4
    assert config.tasks == ["mrpc", "sst2", "sentiment140"]
    path.write_text("epochz: 2\n")
    with pytest.raises(ValueError, match="epochz"):
        load_config(None, path)
    with pytest.raises(ValueError, match="Unknown method"):
        ContinualConfig(methods=["dora"])


def test_cli_method_lrs_become_the_config_field(tmp_path, monkeypatch):
    seen = {}

    class Recording:
        def __init__(self, config, run_dir, **options):
            seen["config"] = config

        def run(self):
            return None

    import curlora.continual
    monkeypatch.setattr(curlora.continual, "ContinualRunner", Recording)
    assert main(["continual", "--lrs", "1e-3", "--method-lrs", "curlora=1e-2,3e-2", "--method-lrs", "lora=3e-3",
                 "--output-dir", str(tmp_path)]) == 0
    assert seen["config"].method_lrs == {"curlora": [1e-2, 3e-2], "lora": [3e-3]}
    assert main(["continual", "--ranks", "8,16", "--method-lrs", "curlora@8=1e-2", "--method-lrs", "curlora@16=3e-3",
                 "--output-dir", str(tmp_path)]) == 0
    assert seen["config"].method_lrs == {"curlora": {8: [1e-2], 16: [3e-3]}}


def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    assert main(["continual", "--config", str(tmp_path / "missing.yaml"), "--output-dir", str(tmp_path)]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_sweep_writes_frontier_and_eq11_penalty_shrinks_u(tmp_path, tiny_model_dir, data_dir):
    config = tiny_config(tiny_model_dir, data_dir, methods=["curlora", "head"], lrs=[1e-3, 3e-2],
                         u_penalties=[0.0, 1.0], tasks=["sst2"])
    results = ContinualRunner(config, tmp_path).run()
    frontier = results["frontier"]
    assert {c["method"] for c in frontier["selection"]} == {"curlora", "curlora+eq11(λ=1)", "head"}
    assert len(frontier["points"]) == 5
    assert (tmp_path / "frontier.png").is_file()
    assert "Stability–plasticity frontier" in (tmp_path / "report.md").read_text()
    u_norm = {(r["method"], r["lr"]): sum(d["u_norm"] for d in r["diagnostics"])
              for r in results["runs"] if r["method"] != "head"}
    assert u_norm[("curlora+eq11(λ=1)", 3e-2)] < u_norm[("curlora", 3e-2)]


def test_two_process_data_parallel_matches_one_process(tmp_path, tiny_model_dir, data_dir):
    """torchrun, 2 CPU processes (gloo): ranks stay identical, rank 0 alone writes, same numbers."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    args = ["continual", "--model", tiny_model_dir, "--data-dir", str(data_dir), "--tasks", "sst2,mrpc",
            "--corpus", "wikitext2", "--methods", "curlora,head", "--ranks", "4", "--examples-per-task", "24",
            "--eval-examples", "20", "--batch-size", "8", "--max-length", "32", "--lr", "1e-2",
            "--head-lr", "1e-2", "--ppl-max-tokens", "96", "--no-bf16", "--no-progress"]
    single = tmp_path / "single"
    assert main([*args, "--output-dir", str(single)]) == 0
    parallel = tmp_path / "parallel"
    torchrun = str(Path(sys.executable).parent / "torchrun")  # ships with torch
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "curlora.cli", *args,
         "--output-dir", str(parallel)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("# Continual-learning report") == 1  # one report, printed by rank 0
    one = json.loads((single / "results.json").read_text())["runs"]
    two = json.loads((parallel / "results.json").read_text())["runs"]
    for a, b in zip(one, two):
        assert b["data_parallel"] == {"world_size": 2, "max_difference_across_ranks": 0.0}
        assert a["data_parallel"] == {"world_size": 1}
        assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], rel=1e-4)
        assert b["perplexity"]["final"] == pytest.approx(a["perplexity"]["final"], rel=1e-4)
        for row_a, row_b in zip(a["accuracy_matrix"], b["accuracy_matrix"]):
            assert row_b == pytest.approx(row_a, abs=0.051)


def test_a_late_rank_does_not_mistake_a_new_run_for_an_old_one(tmp_path, tiny_model_dir, data_dir):
    """Rank 0 writes config.yaml; a rank that looks after that must still see a fresh run, not refuse it."""
    import os
    import subprocess
    import sys

    script = (
        "import os, sys, time\n"
        "from curlora.continual.runner import ContinualRunner\n"
        "from curlora.continual.parallel import DataParallel\n"
        "from curlora.continual.config import ContinualConfig\n"
        "DataParallel.join('cpu')  # the rendezvous; after it, rank 1 arrives late\n"
        "if os.environ['RANK'] == '1':\n"
        "    time.sleep(2)\n"
        "config = ContinualConfig(model=sys.argv[1], data_dir=sys.argv[2], tasks=['sst2'], progress=False)\n"
        "ContinualRunner(config, sys.argv[3]).run_dir.create(config)  # what run() does once the data loaded\n"
    )
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, tiny_model_dir, str(data_dir), str(tmp_path / "run")],
            env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": port, "OMP_NUM_THREADS": "1"},
            stderr=subprocess.PIPE, text=True,
        )
        for rank in (0, 1)
    ]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], errors
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_own_corpus_file_is_scored_and_named(tmp_path, tiny_model_dir, data_dir, capsys):
    corpus = tmp_path / "style-guide.txt"
    corpus.write_text("Write short sentences. Prefer the active voice.\n\nCut every word you can.\n" * 8)
    config = tiny_config(tiny_model_dir, data_dir, methods=["head"], tasks=["sst2"], corpus_file=str(corpus))
    results = ContinualRunner(config, tmp_path / "run").run()
    entry = results["corpus"]
    assert entry["name"] == "style-guide.txt" and entry["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert str(tmp_path) not in json.dumps(entry)  # no directory of this machine in the results
    assert entry["bytes"] == corpus.stat().st_size and entry["tokens_scored"] == 95  # ppl_max_tokens 96
    assert "style-guide.txt" in (tmp_path / "run" / "report.md").read_text()
    # The same file through the flag gives the same base perplexity.
    args = ["continual", "--model", tiny_model_dir, "--data-dir", str(data_dir), "--tasks", "sst2", "--methods",
            "head", "--ranks", "4", "--examples-per-task", "24", "--eval-examples", "20", "--max-length", "32",
            "--head-lr", "1e-2", "--ppl-max-tokens", "96", "--ppl-window", "64", "--ppl-stride", "32",
            "--corpus-file", str(corpus), "--no-progress", "--output-dir", str(tmp_path / "flag")]
    capsys.readouterr()
    transformers.utils.logging.enable_progress_bar()
    assert main(args) == 0
    assert "Loading weights" not in capsys.readouterr().err  # --no-progress silences transformers' bar too
    saved = json.loads((tmp_path / "flag" / "results.json").read_text())
    assert saved["corpus"]["name"] == "style-guide.txt"
    assert saved["runs"][0]["perplexity"]["before"] == pytest.approx(results["runs"][0]["perplexity"]["before"])


def test_resume_extends_the_grid_and_keeps_finished_runs(tmp_path, tiny_model_dir, data_dir):
    """More seeds (or rates, or methods) on --resume: only the new runs train, config.yaml says the new grid,
    and the report covers exactly the grid asked for; a changed variant is still refused."""
    one = ContinualRunner(tiny_config(tiny_model_dir, data_dir, methods=["head"], seeds=[0]), tmp_path).run()
    finished = (tmp_path / "runs" / "head_s0.json").stat().st_mtime_ns
    two = ContinualRunner(tiny_config(tiny_model_dir, data_dir, methods=["head"], seeds=[0, 1]), tmp_path,
                          resume=True).run()
    assert (tmp_path / "runs" / "head_s0.json").stat().st_mtime_ns == finished  # not redone
    assert [run["seed"] for run in two["runs"]] == [0, 1] and two["runs"][0] == one["runs"][0]
    assert ContinualConfig.from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())).seeds == [0, 1]
    back = ContinualRunner(tiny_config(tiny_model_dir, data_dir, methods=["head"], seeds=[1]), tmp_path,
                           resume=True).run()
    assert [run["seed"] for run in back["runs"]] == [1]
    variant = {"lora-r": {"base": "lora", "init_lora_weights": "gaussian"}}
    config = tiny_config(tiny_model_dir, data_dir, methods=["head"], seeds=[1], method_variants=variant)
    ContinualRunner(config, tmp_path, resume=True).run_dir.create(config)  # a new variant may be added ...
    changed = {"lora-r": {"base": "lora", "init_lora_weights": "pissa"}}
    with pytest.raises(ValueError, match=r"method_variants\['lora-r'\]"):  # ... not redefined
        ContinualRunner(tiny_config(tiny_model_dir, data_dir, methods=["head"], seeds=[1], method_variants=changed),
                        tmp_path, resume=True)


def test_the_paper_small_preset_keeps_the_papers_setup_at_a_cpu_size(tmp_path, tiny_model_dir, smol_tokenizer, data_dir):
    paper, small = load_config("paper"), load_config("paper-small", overrides={"data_dir": str(data_dir)})
    kept = ("tasks", "corpus", "ranks", "alpha", "epochs", "max_length", "ppl_window", "ppl_stride", "target_modules")
    assert {k: getattr(small, k) for k in kept} == {k: getattr(paper, k) for k in kept}
    assert small.tasks == ["mrpc", "sst2", "sentiment140"] and small.ranks == [8, 16, 24] and small.epochs == 3
    data = load_data(dataclasses.replace(small, model=tiny_model_dir), smol_tokenizer)
    # 120 training rows a task and a validation split large enough to choose a rate on (80, not 21).
    assert [len(t.train) for t in data.tasks] == [120, 120, 121]
    assert [len(v) for v in data.validation] == [80, 80, 79]
    assert len(data.corpus_ids) == 8192


def test_the_quick_verdict_preset_runs_each_method_at_its_own_rate_and_says_where_the_evidence_is(
        tmp_path, tiny_model_dir, data_dir):
    preset = load_config("quick-verdict")
    assert preset.methods == ["curlora", "lora", "head", "multitask"] and preset.protocol == "heads"
    config = tiny_config(tiny_model_dir, data_dir, methods=preset.methods, method_lrs=preset.method_lrs,
                         description=preset.description)
    results = ContinualRunner(config, tmp_path).run()
    assert sorted((r["method"], r["lr"]) for r in results["runs"]) == [
        ("curlora", 1e-2), ("head", None), ("lora", 3e-3), ("multitask", 3e-3)]
    report = (tmp_path / "report.md").read_text()
    assert "docs/results.md in the curlora repository" in report.split("## ")[0]  # above the first section
    # A description changes no number: a run directory resumes with another one.
    retold = dataclasses.replace(config, description="Another note.")
    ContinualRunner(retold, tmp_path, resume=True).run()
    assert "Another note." in (tmp_path / "report.md").read_text()


def test_a_description_too_long_for_a_report_heading_is_refused():
    with pytest.raises(ValueError, match="description is 2,001 characters long; keep it under 2,000"):
        ContinualConfig(description="x" * 2001)


def _counting_train_task(monkeypatch):
    """Wrap the run loop's train_task: record each call's run/task label and the model's trainable tensors
    as training starts (a resumed run must start from the checkpoint, not from scratch)."""
    from curlora.continual import loop

    calls = []
    original = loop.train_task

    def counting(model, *args, description="", **kwargs):
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        calls.append((description, start))
        return original(model, *args, description=description, **kwargs)

    monkeypatch.setattr(loop, "train_task", counting)
    return calls


def test_resume_loads_the_checkpoint_and_does_not_train_a_finished_task_again(tmp_path, tiny_model_dir, data_dir,
                                                                               monkeypatch):
    from safetensors.torch import load_file, save_file

    config = tiny_config(tiny_model_dir, data_dir, methods=["curlora"])
    kill_after_first_task(monkeypatch)
    calls = _counting_train_task(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        ContinualRunner(config, tmp_path).run()
    assert [d.split(" · ")[1] for d, _ in calls] == ["sst2"]
    # Edit the checkpoint: a number in its json and every U in its tensors. A resume that retrains
    # (or starts from zero) cannot reproduce either.
    ckpt = tmp_path / "checkpoints" / "curlora_r4_lr0.01_s0"
    state = json.loads((ckpt / "task1.json").read_text())
    state["accuracy_matrix"][1][0] = 0.123456
    state["final_losses"][0] = 42.0
    (ckpt / "task1.json").write_text(json.dumps(state))
    tensors = load_file(str(ckpt / "task1.safetensors"))
    u_keys = [k for k in tensors if k.startswith("model.") and k.endswith(".U")]
    assert len(u_keys) == 6 and all(tensors[k].abs().sum() > 0 for k in u_keys)
    edited = {k: (3 * v if k in u_keys else v) for k, v in tensors.items()}
    save_file(edited, str(ckpt / "task1.safetensors"))
    calls.clear()
    resumed = ContinualRunner(config, tmp_path, resume=True).run()
    assert [d.split(" · ")[1] for d, _ in calls] == ["mrpc"]  # task 0 not trained again
    start = calls[0][1]
    for key in u_keys:  # training of task 1 started from the (edited) checkpoint's U
        assert torch.equal(start[key[len("model."):]], edited[key])
    run = resumed["runs"][0]
    assert run["accuracy_matrix"][1][0] == 0.123456 and run["final_train_loss"][0] == 42.0


def test_resume_with_new_methods_ranks_and_rates_trains_only_the_new_runs(tmp_path, tiny_model_dir, data_dir,
                                                                         monkeypatch):
    calls = _counting_train_task(monkeypatch)
    base = dict(examples_per_task=16, eval_examples=12)
    first = ContinualRunner(tiny_config(tiny_model_dir, data_dir, methods=["head", "curlora"], ranks=[4],
                                        lrs=[1e-2], **base), tmp_path).run()
    assert sorted({d.split(" · ")[0] for d, _ in calls}) == ["curlora_r4_lr0.01_s0", "head_s0"]
    finished = {p.name: p.read_bytes() for p in (tmp_path / "runs").iterdir()}
    grids = [
        dict(methods=["head", "curlora", "lora"], ranks=[4], lrs=[1e-2]),  # a new method
        dict(methods=["head", "curlora", "lora"], ranks=[4, 2], lrs=[1e-2]),  # a new rank
        dict(methods=["head", "curlora", "lora"], ranks=[4, 2], lrs=[1e-2, 3e-3]),  # a new rate
    ]
    expected_new = [
        ["lora_r4_lr0.01_s0"],
        ["curlora_r2_lr0.01_s0", "lora_r2_lr0.01_s0"],
        ["curlora_r2_lr0.003_s0", "curlora_r4_lr0.003_s0", "lora_r2_lr0.003_s0", "lora_r4_lr0.003_s0"],
    ]
    for grid, new in zip(grids, expected_new):
        calls.clear()
        results = ContinualRunner(tiny_config(tiny_model_dir, data_dir, **grid, **base), tmp_path, resume=True).run()
        trained = [d.split(" · ")[0] for d, _ in calls]
        assert sorted(set(trained)) == new and len(trained) == 2 * len(new)  # each new run: both tasks once
        for name, content in finished.items():  # earlier runs' files untouched
            assert (tmp_path / "runs" / name).read_bytes() == content
        finished = {p.name: p.read_bytes() for p in (tmp_path / "runs").iterdir()}
    assert len(results["runs"]) == 1 + 2 * 2 * 2  # head + {curlora, lora} × 2 ranks × 2 rates
    # The first runs read back as they were (but for the frontier's choice of rate among the new ones).
    for got, want in zip(results["runs"][:2], first["runs"]):
        assert {k: v for k, v in got.items() if k != "selected"} == {k: v for k, v in want.items() if k != "selected"}


def test_ceilings_learn_all_tasks_at_once_or_each_alone(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    from curlora.continual import loop

    learned = {}
    original = loop.train_task

    def recording(model, items, *args, **kwargs):
        learned.setdefault(kwargs["description"].split("_r4_")[0], []).append(sorted({j for _, j in items}))
        return original(model, items, *args, **kwargs)

    monkeypatch.setattr(loop, "train_task", recording)
    config = tiny_config(tiny_model_dir, data_dir, methods=["multitask", "single-task", "lora", "head"])
    results = ContinualRunner(config, tmp_path).run()
    runs = {run["method"]: run for run in results["runs"]}
    # multitask: one training pass over both tasks' rows (and both heads), nothing after it.
    assert learned["multitask"] == [[0, 1]] and learned["single-task"] == [[0], [1]]
    multitask = runs["multitask"]
    assert [len(steps) for steps in multitask["train_loss"]] == [6, 0]  # 2 × 24 rows at batch 8, then none
    assert multitask["ceiling"] and not multitask["sequential"]
    # single-task: task 1's own LoRA leaves task 0's accuracy (scored with task 0's LoRA) exactly as it was.
    single = runs["single-task"]
    assert single["accuracy_matrix"][2][0] == single["accuracy_matrix"][1][0]
    assert single["needs_task_identity"] and single["stored_per_task"] > 0 and single["sequential"]
    summary = {g["method"]: g for g in results["summary"]}
    assert summary["multitask"]["forgetting"] is None and summary["single-task"]["forgetting"]["mean"] == 0
    report = (tmp_path / "report.md").read_text()
    assert "[ceiling]" in report and "learns every task at once: BWT and forgetting are not defined" in report
    assert "of the way from the floor (head" in report


def test_a_committed_experiment_folder_continues_from_a_fresh_clone(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """An experiment under docs/results/<name> is killed mid-way, its folder committed as the repository's
    .gitignore lets it be (run files, config, base perplexity; no checkpoints or lock), and the same
    command on a fresh clone trains only the missing runs and ends with the same results."""
    import shutil
    import subprocess

    from curlora.continual import loop

    config = tiny_config(tiny_model_dir, data_dir, methods=["lora", "head"], lrs=[1e-2, 3e-2], confirm_seeds=[1])
    uninterrupted = ContinualRunner(config, tmp_path / "whole").run()
    repo = tmp_path / "repo"
    folder = repo / "docs" / "results" / "experiment"
    shutil.copy(Path(__file__).resolve().parents[1] / ".gitignore", repo.mkdir() or repo / ".gitignore")
    original, saved = loop.save_task, []

    def killed_on_the_third_run(ckpt_dir, adapted, protocol, state):
        original(ckpt_dir, adapted, protocol, state)
        saved.append(ckpt_dir.name)
        if len(set(saved)) == 3:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(loop, "save_task", killed_on_the_third_run)
    with pytest.raises(KeyboardInterrupt):
        ContinualRunner(config, folder).run()
    assert (folder / "checkpoints").is_dir()  # the third run's first task, which a commit leaves out

    def git(*args, cwd=repo):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                       capture_output=True)

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "two runs of the experiment")
    git("clone", "-q", str(repo), str(tmp_path / "clone"), cwd=tmp_path)
    clone = tmp_path / "clone" / "docs" / "results" / "experiment"
    assert not (clone / "checkpoints").exists() and not (clone / ".lock").exists()
    committed = {p.stem for p in (clone / "runs").glob("*.json")}
    assert len(committed) == 2 and (clone / "config.yaml").is_file() and (clone / "base_perplexity.json").is_file()
    trained = []
    monkeypatch.setattr(loop, "save_task", lambda ckpt_dir, *args: trained.append(ckpt_dir.name) or original(ckpt_dir, *args))
    resumed = ContinualRunner(config, clone, resume=True).run()
    every = {p.stem for p in (tmp_path / "whole" / "runs").glob("*.json")}
    assert set(trained) == every - committed and len(every) == 5  # 2 × 2 grid runs, 1 confirming run
    assert _comparable(resumed) == _comparable(uninterrupted)


def test_runs_of_another_experiment_with_the_same_settings_are_reused_not_trained(tmp_path, tiny_model_dir, data_dir,
                                                                                 monkeypatch):
    first = ContinualRunner(tiny_config(tiny_model_dir, data_dir, methods=["curlora", "head"]), tmp_path / "first").run()
    calls = _counting_train_task(monkeypatch)
    wider = tiny_config(tiny_model_dir, data_dir, methods=["curlora", "lora", "head"], seeds=[0, 1])
    results = ContinualRunner(wider, tmp_path / "second", reuse_from=tmp_path / "first").run()
    # Only the runs the first experiment does not hold were trained; its two came over unchanged.
    trained = ["curlora_r4_lr0.01_s1", "lora_r4_lr0.01_s0", "lora_r4_lr0.01_s1", "head_s1"]
    assert sorted(d.split(" · ")[0] for d, _ in calls) == sorted(trained * 2)  # two tasks each
    reused = {r["method"]: r for r in results["runs"] if r["seed"] == 0 and r["method"] != "lora"}
    assert _comparable({"runs": [reused["curlora"], reused["head"]]}) == _comparable(first)
    assert (tmp_path / "second" / "runs" / "curlora_r4_lr0.01_s0.json").is_file()


def test_runs_made_with_other_settings_are_refused_for_reuse_before_any_work(tmp_path, tiny_model_dir, data_dir):
    ContinualRunner(tiny_config(tiny_model_dir, data_dir, methods=["head"]), tmp_path / "first").run()
    other = tiny_config(tiny_model_dir, data_dir, methods=["head"], eval_examples=12)
    with pytest.raises(ValueError, match=r"Cannot reuse the runs of .*first: its config differs in eval_examples \(\d+ there, 12 here\), so"):
        ContinualRunner(other, tmp_path / "second", reuse_from=tmp_path / "first")
    assert not (tmp_path / "second").exists()
    with pytest.raises(FileNotFoundError, match="holds no curlora run"):
        ContinualRunner(other, tmp_path / "second", reuse_from=tmp_path)
    with pytest.raises(ValueError, match="names the --output-dir itself"):
        ContinualRunner(tiny_config(tiny_model_dir, data_dir, methods=["head"]), tmp_path / "first", resume=True,
                        reuse_from=tmp_path / "first")


def test_an_interim_report_shows_the_finished_runs_and_names_the_missing_ones_training_none(
        tmp_path, tiny_model_dir, data_dir, monkeypatch):
    ContinualRunner(tiny_config(tiny_model_dir, data_dir, methods=["head"]), tmp_path).run()
    calls = _counting_train_task(monkeypatch)
    wider = tiny_config(tiny_model_dir, data_dir, methods=["curlora", "head"], lrs=[1e-2, 3e-2], confirm_seeds=[1])
    results = ContinualRunner(wider, tmp_path, report_only=True).run()
    assert calls == []
    assert [r["method"] for r in results["runs"]] == ["head"]
    # The grid's two CURLoRA runs; the confirming runs of seed 1 (head, and CURLoRA at the rate the grid
    # chooses) are due only once the grid is complete, so a partial grid names those it can.
    assert results["interim"]["finished"] == 1 and "curlora_r4_lr0.01_s0" in results["interim"]["missing"]
    assert json.loads((tmp_path / "results.json").read_text())["interim"] == results["interim"]
    assert "**Interim report**: 1 of the experiment's runs have finished" in (tmp_path / "report.md").read_text()
    # The experiment's own command then trains the rest; its results are no longer interim.
    final = ContinualRunner(wider, tmp_path, resume=True).run()
    assert "interim" not in final and "Interim" not in (tmp_path / "report.md").read_text()
    with pytest.raises(FileNotFoundError, match="holds no curlora run"):
        ContinualRunner(wider, tmp_path / "empty", report_only=True)
