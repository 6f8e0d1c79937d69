"""Untrusted adapter directories, names that would become paths, and run directories, each tried as an
attacker would: every crafted input is refused with a ValueError naming the file and the field, and
leaves the model (or the run) exactly as it was."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors import safe_open
from safetensors.torch import save_file

from curlora import AdapterFileError, CURLoRAConfig, CURLoRAModel, get_curlora_model
from curlora.cli import main
from curlora.continual import ContinualRunner
from curlora.continual.checkpoints import load_latest
from curlora.continual.config import ContinualConfig
from curlora.continual.rundir import RunFileError, read_run

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
LAYER = "model.layers.0.self_attn.q_proj"


def snapshot(model: torch.nn.Module) -> tuple[str, list[tuple[str, str]], list[bool]]:
    """A hash of the state dict, the module structure, and which parameters train."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    structure = [(name, type(module).__name__) for name, module in model.named_modules()]
    return digest.hexdigest(), structure, [p.requires_grad for p in model.parameters()]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A genuine adapter (r=4, lm_head saved too) trained a step away from zero."""
    directory = tmp_path_factory.mktemp("adapter")
    model = get_curlora_model(tiny_llama(), CURLoRAConfig(r=4, modules_to_save=["lm_head"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    model.save_pretrained(directory)
    return directory


def _config_attack(text_edit):
    def attack(directory: Path) -> None:
        path = directory / CONFIG
        path.write_text(text_edit(path.read_text()))
    return attack


def _field(name: str, raw: str):
    """Set one field of adapter_config.json to the raw JSON text ``raw`` (NaN and Infinity included)."""
    def edit(text: str) -> str:
        data = json.loads(text)
        data[name] = "@@"
        return json.dumps(data).replace('"@@"', raw)
    return _config_attack(edit)


def _tensors(edit):
    def attack(directory: Path) -> None:
        path = directory / WEIGHTS
        with safe_open(str(path), framework="pt") as f:
            metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        edit(tensors, metadata)
        save_file(tensors, str(path), metadata=metadata)
    return attack


def _set(key: str, value):
    return _tensors(lambda tensors, metadata: tensors.__setitem__(f"{LAYER}.{key}", value(tensors[f"{LAYER}.{key}"])))


def _nan_u(u):
    u = u.clone()
    u[0, 0] = float("nan")
    return u


def _inf_u(u):
    u = u.clone()
    u[1, 2] = float("inf")
    return u


def _negative(indices):
    indices = indices.clone()
    indices[0, 0] = -1
    return indices


def _too_large(indices):
    indices = indices.clone()
    indices[1, 0] = 10_000
    return indices


ATTACKS = {
    "rtol Infinity": (_field("fingerprint_rtol", "Infinity"), "Infinity is not a JSON number"),
    "rtol huge": (_field("fingerprint_rtol", "1e9"), "fingerprint_rtol"),
    "rtol NaN": (_field("fingerprint_rtol", "NaN"), "NaN"),
    "alpha NaN": (_field("alpha", "NaN"), "NaN"),
    "alpha string": (_field("alpha", '"1.0"'), "alpha"),
    "r string": (_field("r", '"4"'), "r must"),
    "r true": (_field("r", "true"), "r must"),
    "sampling unknown": (_field("sampling", '"bogus"'), "sampling"),
    "dropout string": (_field("dropout", '"0.1"'), "dropout"),
    "normalize string": (_field("normalize", '"yes"'), "normalize"),
    "modules_to_save string": (_field("modules_to_save", '"lm_head"'), "modules_to_save must be a list"),
    "modules_to_save unknown": (_field("modules_to_save", '["lm_head", "nope"]'), "modules_to_save entry 'nope'"),
    "target_modules number": (_field("target_modules", "7"), "target_modules"),
    "config a list": (_config_attack(lambda text: "[1, 2]"), "JSON object"),
    "config broken": (_config_attack(lambda text: text[:20]), CONFIG),
    "U NaN": (_set("curlora_U", _nan_u), "NaN or infinite"),
    "U Inf": (_set("curlora_U", _inf_u), "NaN or infinite"),
    "U wrong rank": (_set("curlora_U", lambda u: u[:3, :3].contiguous()), "curlora_U"),
    "indices negative": (_set("curlora_indices", _negative), "must lie in"),
    "indices too large": (_set("curlora_indices", _too_large), "must lie in"),
    "indices float": (_set("curlora_indices", lambda i: i.float()), "curlora_indices"),
    "indices wrong shape": (_set("curlora_indices", lambda i: i[:, :3].contiguous()), "curlora_indices"),
    "fingerprint Inf": (_set("curlora_fingerprint", lambda f: f * float("inf")), "NaN or infinite"),
    "U missing": (_tensors(lambda t, m: t.pop(f"{LAYER}.curlora_U")), "curlora_U' is missing"),
    "unlisted tensor": (_tensors(lambda t, m: t.__setitem__("evil.curlora_U", torch.zeros(4, 4))), "evil"),
    "modules_to_save wrong shape": (
        _tensors(lambda t, m: t.__setitem__("modules_to_save.lm_head.weight", torch.zeros(3, 3))), "lm_head.weight"),
    "modules_to_save NaN": (
        _tensors(lambda t, m: t["modules_to_save.lm_head.weight"].fill_(float("nan"))), "lm_head.weight"),
    "shapes metadata bad": (_tensors(lambda t, m: m.__setitem__("shapes", '{"x": [1]}')), "shape in the metadata"),
    "weights truncated": (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:200]), WEIGHTS),
}


@pytest.fixture
def crafted(saved, tmp_path, request) -> tuple[Path, str]:
    attack, message = ATTACKS[request.param]
    directory = tmp_path / "crafted"
    directory.mkdir()
    for name in (CONFIG, WEIGHTS):
        (directory / name).write_bytes((saved / name).read_bytes())
    attack(directory)
    return directory, message


@pytest.mark.parametrize("crafted", sorted(ATTACKS), indirect=True)
def test_crafted_adapter_is_refused_and_leaves_the_model_as_it_was(crafted):
    directory, message = crafted
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message) as refused:
        CURLoRAModel.from_pretrained(model, directory)
    assert str(directory) in str(refused.value)  # the file is named
    assert snapshot(model) == before

    wrapped = get_curlora_model(tiny_llama(), CURLoRAConfig(r=2))  # an existing wrapper with an adapter
    before = snapshot(wrapped)
    with pytest.raises(ValueError, match=message):
        wrapped.load_adapter(directory, "other")
    assert snapshot(wrapped) == before and list(wrapped.peft_config) == ["default"]


def test_refused_load_can_be_followed_by_a_good_one(saved, tmp_path):
    """A refusal once left the model half-wrapped, so that loading again failed."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / WEIGHTS).write_bytes((saved / WEIGHTS).read_bytes())
    (bad / CONFIG).write_text((saved / CONFIG).read_text().replace('"lm_head"', '"lm_head", "nope"'))
    wrapped = CURLoRAModel(tiny_llama())
    with pytest.raises(ValueError, match="nope"):
        wrapped.load_adapter(bad)
    wrapped.load_adapter(saved)
    assert list(wrapped.peft_config) == ["default"]


def test_the_largest_allowed_rtol_still_refuses_another_base(saved, tmp_path):
    directory = tmp_path / "loose"
    directory.mkdir()
    (directory / WEIGHTS).write_bytes((saved / WEIGHTS).read_bytes())
    config = json.loads((saved / CONFIG).read_text())
    (directory / CONFIG).write_text(json.dumps({**config, "fingerprint_rtol": 0.5}))
    CURLoRAModel.from_pretrained(tiny_llama(), directory)  # its own base
    with pytest.raises(ValueError, match="relative difference"):
        CURLoRAModel.from_pretrained(tiny_llama(seed=1), directory)


def test_adapter_config_errors_are_adapter_file_errors(saved, tmp_path):
    directory = tmp_path / "c"
    directory.mkdir()
    (directory / WEIGHTS).write_bytes((saved / WEIGHTS).read_bytes())
    (directory / CONFIG).write_text(json.dumps({**json.loads((saved / CONFIG).read_text()), "alpha": None}))
    with pytest.raises(AdapterFileError, match=rf"{CONFIG}: CURLoRAConfig\.alpha"):
        CURLoRAModel.from_pretrained(tiny_llama(), directory)


BAD_NAMES = ["/tmp/evil", "../evil", "a/b", "..", "", "x\0y", "a\\b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_adapter_names_that_are_paths_are_refused(name, saved, tmp_path):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="adapter name"):
        get_curlora_model(model, CURLoRAConfig(r=2), adapter_name=name)
    with pytest.raises(ValueError, match="adapter name"):
        CURLoRAModel.from_pretrained(model, saved, adapter_name=name)
    assert snapshot(model) == before
    wrapped = get_curlora_model(tiny_llama(), CURLoRAConfig(r=2))
    with pytest.raises(ValueError, match="adapter name"):
        wrapped.add_adapter(name, CURLoRAConfig(r=2))
    with pytest.raises(ValueError, match="adapter name"):
        wrapped.load_adapter(saved, name)
    wrapped.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [CONFIG, WEIGHTS]


@pytest.mark.parametrize("name", ["../evil", "/tmp/evil", "lora/x", "..", "peft:../x"])
def test_method_variant_names_that_are_paths_are_refused(name):
    with pytest.raises(ValueError, match="method name"):
        ContinualConfig(methods=[name], method_variants={name: {"base": "lora"}})
    with pytest.raises(ValueError, match="method name"):
        ContinualConfig(methods=["lora"], method_variants={name: {"base": "lora"}})
    with pytest.raises(ValueError, match="method name"):
        ContinualConfig(methods=[f"lora+{name}"])


# -- run directories ----------------------------------------------------------------------------------
def _run_config(**overrides) -> ContinualConfig:
    return ContinualConfig(methods=["head"], **overrides)


def _created(run_dir: Path, config: ContinualConfig) -> None:
    """A run directory as a command leaves it once it has written config.yaml and ended."""
    runner = ContinualRunner(config, run_dir)
    runner.run_dir.create(config)
    runner.run_dir.unlock()


@pytest.mark.parametrize("resume", [False, True])
def test_a_symlinked_lock_leaves_its_target_intact(tmp_path, resume):
    run_dir, target = tmp_path / "run", tmp_path / "precious.txt"
    run_dir.mkdir()
    if resume:
        _created(run_dir, _run_config())
        (run_dir / ".lock").unlink()
    target.write_text("precious")
    (run_dir / ".lock").symlink_to(target)
    with pytest.raises((FileExistsError, RunFileError), match="symbolic link"):  # resuming: refused on sight
        ContinualRunner(_run_config(), run_dir, resume=resume).run()
    assert target.read_text() == "precious"


def test_two_commands_on_one_new_directory_leave_the_first_resumable(tmp_path):
    run_dir = tmp_path / "run"
    first = ContinualRunner(_run_config(), run_dir)
    second = ContinualRunner(_run_config(epochs=2), run_dir)  # both looked while the directory was new
    first.run_dir.create(_run_config())  # the first writes its config.yaml, holding the lock
    saved = (run_dir / "config.yaml").read_bytes()
    with pytest.raises(FileExistsError, match="in use by a running curlora command"):
        second.run()
    first.run_dir.unlock()  # the first command ends
    with pytest.raises(FileExistsError, match="another curlora command started a run"):
        second.run()
    assert (run_dir / "config.yaml").read_bytes() == saved
    ContinualRunner(_run_config(), run_dir, resume=True)  # the first run resumes
    with pytest.raises(ValueError, match="epochs"):
        ContinualRunner(_run_config(epochs=2), run_dir, resume=True)


def test_a_directory_with_other_files_is_not_taken_for_a_new_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds files but no curlora run"):
        ContinualRunner(_run_config(), tmp_path)
    (tmp_path / "notes.txt").unlink()
    (tmp_path / ".lock").write_text("")  # a command killed before it wrote config.yaml
    ContinualRunner(_run_config(), tmp_path)


@pytest.mark.parametrize("content", ['{"value": -3.0}', '{"value": NaN}', '{"value": "17"}', "{", "[]"])
def test_an_edited_base_perplexity_is_refused_naming_the_file(tmp_path, content):
    _created(tmp_path, _run_config())
    (tmp_path / "base_perplexity.json").write_text(content)
    runner = ContinualRunner(_run_config(), tmp_path, resume=True)
    with pytest.raises(RunFileError, match="base_perplexity.json"):
        runner.run_dir.base_perplexity()  # read before any model is needed


def _state(**changes):
    return {"accuracy_matrix": [[0.5, None], [0.75, None]], "ppl_after_task": [20.0], "final_losses": [0.3],
            "elapsed_s": 4.0, "tasks_done": 1, **changes}


@pytest.mark.parametrize("state", [
    _state(accuracy_matrix=[[0.5, None], [7.0, None]]), _state(ppl_after_task=[-1.0]), _state(final_losses=["x"]),
    _state(tasks_done=2), {"tasks_done": 1}, _state(accuracy_matrix=[[0.5]]),
])
def test_a_damaged_checkpoint_state_is_refused_naming_the_file(tmp_path, state):
    _created(tmp_path, _run_config())
    ckpt = tmp_path / "checkpoints" / "head_s0"
    ckpt.mkdir(parents=True)
    (ckpt / "task1.json").write_text(json.dumps(state))
    (ckpt / "task1.safetensors").write_bytes(b"")
    ContinualRunner(_run_config(), tmp_path, resume=True)
    with pytest.raises(RunFileError, match="task1.json"):
        load_latest(ckpt, None, None, [])
    (ckpt / "task1.json").write_text(json.dumps(_state()))  # a good state, damaged tensors
    with pytest.raises(RunFileError, match="task1.safetensors"):
        load_latest(ckpt, None, None, [])


@pytest.mark.parametrize("run", [
    "not json", {"method": "head"}, {"method": "head", "status": "ok", "accuracy_matrix": [[0.5], [2.0]]},
    {"method": "head", "status": "ok", "accuracy_matrix": [[0.5], [0.5]], "perplexity": {"before": -1}},
])
def test_a_damaged_run_result_is_refused_naming_the_file(tmp_path, run):
    path = tmp_path / "head_s0.json"
    path.write_text(run if isinstance(run, str) else json.dumps(run))
    with pytest.raises(RunFileError, match="head_s0.json"):
        read_run(path, tasks=1)


# -- curlora generate -----------------------------------------------------------------------------------
@pytest.mark.parametrize("recorded", ["attacker/model", "relative/dir", "/no/such/model"])
def test_generate_does_not_take_its_base_from_an_unchecked_field(saved, tmp_path, capsys, monkeypatch, recorded):
    import curlora.pretrained

    monkeypatch.setattr(curlora.pretrained, "load_model_and_tokenizer",
                        lambda *a, **k: pytest.fail("a model was loaded"))
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / WEIGHTS).write_bytes((saved / WEIGHTS).read_bytes())
    config = json.loads((saved / CONFIG).read_text())
    (directory / CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": recorded}))
    (directory / "sft_summary.json").write_text(json.dumps({"settings": {"model": recorded}}))
    assert main(["generate", "--adapter", str(directory), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --model" in err[0] and CONFIG in err[0]
