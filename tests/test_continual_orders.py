"""Task orders as an axis, like seeds: one run key per order, today's key for the tasks as listed, every
metric per order, rate selection pooled over orders, resume training only the missing runs."""

import json

import pytest

from conftest import save_tiny_llama

from curlora.continual import ContinualRunner, run_specs
from curlora.continual.frontier import select_learning_rates
from curlora.continual.metrics import run_metrics

from test_continual import tiny_config


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer)


def test_orders_give_distinct_keys_and_the_listed_order_keeps_todays_key(tmp_path, data_dir):
    plain = tiny_config(None, data_dir, methods=["curlora", "head"], seeds=[0, 1])
    listed = [spec.key for spec in run_specs(plain)]
    assert listed == ["curlora_r4_lr0.01_s0", "head_s0", "curlora_r4_lr0.01_s1", "head_s1"]  # today's keys
    both = tiny_config(None, data_dir, methods=["curlora", "head"], seeds=[0, 1], orders=[["sst2", "mrpc"],
                                                                                           ["mrpc", "sst2"]])
    keys = [spec.key for spec in run_specs(both)]
    assert len(set(keys)) == len(keys) == 8
    assert set(listed) <= set(keys)  # the listed order: the same run files as without orders
    assert "curlora_r4_lr0.01_s0_order-1-0" in keys and "head_s1_order-1-0" in keys
    named = tiny_config(None, data_dir, methods=["head"], orders={"given": ["sst2", "mrpc"], "swapped": ["mrpc", "sst2"]})
    assert [(spec.key, spec.order, spec.sequence) for spec in run_specs(named)] == [
        ("head_s0", "given", (0, 1)), ("head_s0_order-swapped", "swapped", (1, 0))]
    confirm = tiny_config(None, data_dir, methods=["lora"], lrs=[1e-3, 1e-2], confirm_seeds=[1],
                          orders={"given": ["sst2", "mrpc"], "swapped": ["mrpc", "sst2"]})
    confirming = [spec.key for spec in run_specs(confirm, {("lora", 4): 1e-2}) if spec.seed == 1]
    assert confirming == ["lora_r4_lr0.01_s1", "lora_r4_lr0.01_s1_order-swapped"]  # the chosen rate, in every order


def test_runs_in_each_order_are_reported_per_order_and_pooled(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    from curlora.continual import plots

    titles, save = [], plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: (titles.append(
        [ax.get_title() for ax in fig.axes] + [fig._suptitle.get_text() if fig._suptitle else ""]), save(fig, path)))
    config = tiny_config(tiny_model_dir, data_dir, methods=["head", "lora"], lrs=[1e-3, 1e-2],
                         orders={"given": ["sst2", "mrpc"], "swapped": ["mrpc", "sst2"]})
    results = ContinualRunner(config, tmp_path).run()
    runs = {(r["method"], r["lr"], r["order"]): r for r in results["runs"]}
    assert len(runs) == 6
    swapped, given = runs[("head", None, "swapped")], runs[("head", None, "given")]
    assert swapped["task_order"] == [1, 0] and given["task_order"] == [0, 1]
    # Each task keeps its head whatever its place: the head-only floor's final accuracy per task is the same.
    assert run_metrics(swapped)["task_accuracy"] == pytest.approx(run_metrics(given)["task_accuracy"])
    assert swapped["accuracy_matrix"][1][1] is None and swapped["accuracy_matrix"][1][0] is not None
    assert swapped["accuracy_matrix"][0] == given["accuracy_matrix"][0][::-1]  # before training, in its order
    # One rate per method, chosen on validation pooled over both orders.
    (lora,) = [c for c in results["frontier"]["selection"] if c["method"] == "lora"]
    pooled = {lr: sum(sum(r["validation_accuracy"]) / 2 for (m, l, _), r in runs.items() if m == "lora" and l == lr) / 2
              for lr in (1e-3, 1e-2)}
    assert lora["validation_accuracy"] == pytest.approx(pooled)
    assert select_learning_rates(results["runs"]) == results["frontier"]["selection"]
    assert {(g["method"], g["order"]) for g in results["summary_by_order"]} >= {("head", "given"), ("head", "swapped")}
    head = next(g for g in results["summary"] if g["method"] == "head")
    assert head["n_runs"] == 2 and head["orders"] == ["given", "swapped"]
    report = (tmp_path / "report.md").read_text()
    assert "## Per task order" in report and "over seeds and task orders" in report
    assert "not independent samples" in report  # pooled intervals over orders say what they overstate
    assert "pooled over every task order run" in report and "after task 1 learned" in report
    assert "### head, seed 0, order swapped, lr —" in report
    (perplexity,) = [t[0] for t in titles if t[0].startswith("LM perplexity")]
    assert "bars: 95 % interval over seeds and task orders" in perplexity  # the figures say what they pool


def test_a_resumed_experiment_with_orders_trains_only_the_missing_runs(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    from curlora.continual import worker

    trained = []
    original = worker.train_run

    def spy(prepared, spec, base, ckpt_dir):
        trained.append(spec.key)
        return original(prepared, spec, base, ckpt_dir)

    monkeypatch.setattr(worker, "train_run", spy)
    ContinualRunner(tiny_config(tiny_model_dir, data_dir, methods=["head"]), tmp_path).run()  # no orders
    first = json.loads((tmp_path / "runs" / "head_s0.json").read_text())
    assert trained == ["head_s0"]
    orders = tiny_config(tiny_model_dir, data_dir, methods=["head"], seeds=[0, 1],
                         orders=[["sst2", "mrpc"], ["mrpc", "sst2"]])
    results = ContinualRunner(orders, tmp_path, resume=True).run()
    assert trained == ["head_s0", "head_s0_order-1-0", "head_s1", "head_s1_order-1-0"]
    assert sorted(p.stem for p in (tmp_path / "runs").glob("*.json")) == [
        "head_s0", "head_s0_order-1-0", "head_s1", "head_s1_order-1-0"]
    # The run made without orders is the listed order's run, and is reported as that order.
    given = results["runs"][0]
    assert given["accuracy_matrix"] == first["accuracy_matrix"] and (given["order"], given["task_order"]) == ("0-1", [0, 1])
    assert json.loads((tmp_path / "runs" / "head_s0.json").read_text()) == first  # its file untouched
    ContinualRunner(orders, tmp_path, resume=True).run()
    assert trained == ["head_s0", "head_s0_order-1-0", "head_s1", "head_s1_order-1-0"]  # nothing left to train


@pytest.mark.parametrize(("orders", "message"), [
    ([["sst2"]], r"orders\[0\] must list every task once, in the order learned \(a permutation of \['sst2', 'mrpc'\]\)"),
    ([["mrpc", "sst2"], ["mrpc", "sst2"]], r"orders\[1\] is the same order as orders\[0\]"),
    ({"a/b": ["mrpc", "sst2"]}, "would become a path"),
])
def test_orders_that_are_no_permutation_or_repeat_are_refused(data_dir, orders, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(None, data_dir, methods=["head"], orders=orders)


def test_orders_from_the_command_line_are_task_lists_or_names_the_config_defines(tmp_path, data_dir):
    from curlora.cli import _orders
    from curlora.continual.config import load_config

    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps({"tasks": ["sst2", "mrpc"], "data_dir": str(data_dir), "methods": ["head"],
                                       "orders": {"first": ["sst2", "mrpc"], "second": ["mrpc", "sst2"]}}))
    picked = load_config(None, config_file, {"orders": _orders([["second"]])})
    assert picked.orders == {"second": ["mrpc", "sst2"]}
    listed = load_config(None, config_file, {"orders": _orders([["mrpc", "sst2"]])})
    assert listed.sequences() == {"1-0": (1, 0)}
    with pytest.raises(ValueError, match=r"--orders names \['third'\], but the preset and config name the orders"):
        load_config(None, config_file, {"orders": _orders([["third"]])})
    with pytest.raises(ValueError, match="--orders mixes names"):
        _orders([["second"], ["mrpc", "sst2"]])


def test_the_olora_standard_preset_runs_on_its_files_in_the_orders_asked(tmp_path, tiny_model_dir, capsys):
    from curlora.cli import main
    from curlora.continual.config import load_config

    from test_data_benchmark import write_olora

    labels = {"TC/dbpedia": ["Company", "Artist", "Village"], "SC/amazon": ["negative", "neutral", "positive"],
              "TC/yahoo": ["Sports", "Health"], "TC/agnews": ["World", "Sports", "Business", "Science or Technology"]}
    for folder, names in labels.items():
        kind, name = folder.split("/")
        write_olora(tmp_path, name, names, per_label=6, test_per_label=3, kind=kind)
    root = tmp_path / "CL_Benchmark"
    with pytest.raises(ValueError, match="lies in the data directory: pass --data-dir"):
        load_config("olora-standard")
    config = load_config("olora-standard", overrides={"data_dir": str(root)})
    assert config.task_names == ["dbpedia", "amazon", "yahoo", "agnews"] and config.protocol == "generative"
    assert config.sequences() == {"1": (0, 1, 2, 3), "2": (0, 1, 3, 2), "3": (2, 1, 3, 0)}
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("General text about the world, sports and business.\n" * 20)
    out = tmp_path / "run"
    assert main(["continual", "--preset", "olora-standard", "--data-dir", str(root), "--model", tiny_model_dir,
                 "--methods", "zero-shot", "--orders", "1", "--orders", "3", "--examples-per-task", "8",
                 "--eval-examples", "8", "--corpus-file", str(corpus), "--ppl-max-tokens", "96", "--ppl-window", "64",
                 "--ppl-stride", "32", "--no-progress", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert sorted(p.stem for p in (out / "runs").glob("*.json")) == ["zero-shot_s0", "zero-shot_s0_order-3"]
    assert [t["name"] for t in results["tasks"]] == ["dbpedia", "amazon", "yahoo", "agnews"]
    notes = results["tasks"][0]["notes"]
    assert any("dev.json is byte-identical to test.json, so it is not used" in n for n in notes)
    assert any(n.startswith("train: ") and "stratified subsample (Company: " in n for n in notes)
    assert results["protocol"]["prompts"]["agnews"]["label_words"] == labels["TC/agnews"]
