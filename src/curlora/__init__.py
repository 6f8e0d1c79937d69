"""CURLoRA: stable continual fine-tuning of causal language models (Fawi 2024)."""

__version__ = "0.1.0"

from curlora.config import CURLoRAConfig  # noqa: E402
from curlora.diagnostics import stability_diagnostics  # noqa: E402
from curlora.layer import CURLoRALayer  # noqa: E402
from curlora.model import CURLoRAModel, curlora_layers, get_curlora_model  # noqa: E402
from curlora.config import AdapterFileError  # noqa: E402
from curlora.saving import AdapterMismatchError  # noqa: E402

__all__ = [
    "AdapterFileError",
    "AdapterMismatchError",
    "CURLoRAConfig",
    "CURLoRALayer",
    "CURLoRAModel",
    "curlora_layers",
    "get_curlora_model",
    "stability_diagnostics",
    "__version__",
]
