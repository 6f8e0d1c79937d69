"""The pip extras beyond the core (``pip install curlora`` adapts, saves and loads models): their names,
which of them a command line needs, and the check that names the extra to install when one is missing
(the ``curlora`` command, :func:`curlora.cli.main`, runs it before any work starts).

``EXTRAS`` mirrors pyproject.toml's optional dependencies (a test keeps them equal).
"""

from __future__ import annotations

import importlib.util

#: Distributions of each extra (``all`` installs every one).
EXTRAS: dict[str, tuple[str, ...]] = {
    "bench": ("accelerate", "datasets", "gguf", "matplotlib", "peft", "pyyaml", "tqdm"),
    "sft": ("accelerate", "datasets", "gguf", "trl"),
    "quant": ("bitsandbytes",),
    "gguf": ("gguf",),
    "corda": ("attrs",),  # lora-corda-kpm: PEFT's CorDA imports attrs without declaring it
    "tensorboard": ("tensorboard",),  # curlora continual --log-dir: live event files
    "ray": ("ray",),  # curlora continual --executor ray: runs as Ray tasks on a cluster
}
_IMPORT_NAMES = {"pyyaml": "yaml", "attrs": "attr"}

#: Extras each subcommand needs (every default model is a GGUF file, hence ``gguf``).
COMMAND_EXTRAS: dict[str, tuple[str, ...]] = {
    "continual": ("bench",),
    "sft": ("sft",),
    "generate": ("gguf",),
}


def missing_packages(extra: str) -> list[str]:
    """The distributions of ``extra`` that cannot be imported (checked without importing them)."""
    return [d for d in EXTRAS[extra] if importlib.util.find_spec(_IMPORT_NAMES.get(d, d)) is None]


def require_extra(extra: str, purpose: str) -> None:
    """ImportError naming the missing packages and the pip command, if ``extra`` is incomplete."""
    missing = missing_packages(extra)
    if missing:
        raise ImportError(f"{purpose} needs {', '.join(missing)}: pip install 'curlora[{extra}]'")


def needed_extras(argv: list[str]) -> list[tuple[str, str]]:
    """(extra, purpose) pairs the command line ``argv`` needs."""
    command = next((a for a in argv if not a.startswith("-")), None)
    needed = [(extra, f"curlora {command}") for extra in COMMAND_EXTRAS.get(command, ())]
    if command == "continual" and any(a == "--quantize" or a.startswith("--quantize=") for a in argv):
        needed.append(("quant", "--quantize"))
    if command == "continual" and any(a == "--log-dir" or a.startswith("--log-dir=") for a in argv):
        needed.append(("tensorboard", "--log-dir"))
    if command == "continual" and any(a == "--executor=ray" or (a, b) == ("--executor", "ray")
                                      for a, b in zip(argv, [*argv[1:], ""])):
        needed.append(("ray", "--executor ray"))
    return needed
