"""The continual-learning benchmark (``curlora continual``): tasks in sequence through every
method, learning and forgetting measured, reported with intervals over seeds.

Built on the library core (:mod:`curlora`), which imports nothing from here."""

from curlora.continual.config import PRESETS, ContinualConfig, load_config
from curlora.continual.plan import run_specs
from curlora.continual.runner import ContinualRunner

__all__ = ["PRESETS", "ContinualConfig", "ContinualRunner", "load_config", "run_specs"]
