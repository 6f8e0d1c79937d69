"""One configuration object for a CURLoRA adapter, serialised as ``adapter_config.json``."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from torch import nn

from curlora import checks
from curlora.fileio import atomic_write_bytes
from curlora.targets import default_targets

SamplingMode = Literal["inverse", "standard", "uniform"]
SAMPLING_MODES: tuple[str, ...] = ("inverse", "standard", "uniform")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: The loosest fingerprint tolerance an adapter may ask for (see ``CURLoRAConfig.fingerprint_rtol``).
MAX_FINGERPRINT_RTOL = 0.5


class AdapterFileError(ValueError):
    """An adapter directory's file is malformed or out of range; the message names the file and the field."""


@dataclass
class CURLoRAConfig:
    """Everything that decides an adapter; saved next to its weights so it can be rebuilt.

    ``target_modules`` is either a list of module-name suffixes (``"q_proj"`` matches
    ``model.layers.0.self_attn.q_proj``) or a single regex matched with ``re.fullmatch``
    against the full module name, as in PEFT. ``None`` picks the architecture's q/k/v projections (:mod:`curlora.targets`).
    """

    r: int = 16
    alpha: float = 1.0
    target_modules: list[str] | str | None = None
    dropout: float = 0.0
    sampling: SamplingMode = "inverse"
    replacement: bool = True
    # Scale C's columns and R's rows to unit norm (ΔW = alpha · C_n U R_n): U's steps then move every
    # layer alike. Off in the paper; the benchmark's curlora-normalized variant turns it on.
    normalize: bool = False
    seed: int = 0
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    # Relative tolerance when checking that an adapter is loaded onto the base it was trained on. It is
    # read from the adapter's file (an adapter trained on a quantized base needs ~0.1-0.35 to load on
    # the float one, docs/quantization.md) but bounded by MAX_FINGERPRINT_RTOL: another base of the
    # same shapes differs by ~1 or more, so no file can switch the check off (Infinity, NaN, 1e9).
    fingerprint_rtol: float = 1e-2
    method: str = field(default="CURLORA", init=False)

    def __post_init__(self) -> None:
        """Every field typed and in range: a config also comes from an adapter file nobody checked."""
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (tuple, set)):
            self.modules_to_save = sorted(self.modules_to_save)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"CURLoRAConfig.r must be a positive integer, got {self.r!r}.")
        checks.finite("CURLoRAConfig.alpha", self.alpha)
        if not isinstance(self.target_modules, str):
            _names("CURLoRAConfig.target_modules", self.target_modules)
        checks.fraction("CURLoRAConfig.dropout", self.dropout, low_open=False)
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(
                f"CURLoRAConfig.sampling must be one of {SAMPLING_MODES}, got {self.sampling!r}."
            )
        for name in ("replacement", "normalize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"CURLoRAConfig.{name} must be true or false, got {getattr(self, name)!r}.")
        checks.integer("CURLoRAConfig.seed", self.seed)
        _names("CURLoRAConfig.modules_to_save", self.modules_to_save)
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise ValueError(f"CURLoRAConfig.base_model_name_or_path must be a string, got "
                             f"{self.base_model_name_or_path!r}.")
        checks.positive("CURLoRAConfig.fingerprint_rtol", self.fingerprint_rtol)
        if self.fingerprint_rtol > MAX_FINGERPRINT_RTOL:
            raise ValueError(f"CURLoRAConfig.fingerprint_rtol must be at most {MAX_FINGERPRINT_RTOL} (a looser "
                             f"check would accept another base model), got {self.fingerprint_rtol!r}.")

    def resolved_targets(self, model: nn.Module) -> list[str] | str:
        """The target patterns to use, falling back to the architecture's q/k/v projections."""
        if self.target_modules is not None:
            return self.target_modules
        return default_targets(model)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CURLoRAConfig":
        if not isinstance(data, dict):
            raise ValueError(f"an adapter config must be a JSON object, got {type(data).__name__}.")
        method = data.get("method", "CURLORA")
        if method != "CURLORA":
            raise ValueError(f"Adapter config is for method {method!r}, not CURLoRA.")
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known - {"method"})
        if unknown:
            raise ValueError(f"Unknown CURLoRAConfig fields {unknown}; was it saved by a newer curlora?")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "CURLoRAConfig":
        """The config of an adapter directory; AdapterFileError naming the file and the field if it is bad."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"No {CONFIG_NAME} in {directory}: is it a CURLoRA adapter directory?")
        try:
            return cls.from_dict(json.loads(path.read_bytes(), parse_constant=_refuse_constant))
        except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
            raise AdapterFileError(f"{path}: {error}") from None
        except RecursionError:  # json nests by recursion
            raise AdapterFileError(f"{path}: JSON nested too deep; it is not an adapter config.") from None


def _refuse_constant(name: str) -> None:
    """JSON has no NaN or Infinity; Python's reader accepts them unless told not to."""
    raise ValueError(f"{name} is not a JSON number")


def _names(field_name: str, value: object) -> None:
    """None or a list of non-empty strings (a bare string would be read letter by letter)."""
    if value is not None and not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
        raise ValueError(f"{field_name} must be a list of names, got {value!r}.")


def matches_target(module_name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a regex string must fullmatch the name; list entries match as name suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in targets)
