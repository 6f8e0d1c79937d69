"""QCURLoRA: CURLoRA adapters on a base model whose linear layers are quantized.

A quantization library plugs in as a backend (``backend.QuantizationBackend``: recognise its
layers, dequantize, compute dtype, build a quantized layer) registered in ``registry``; the core
calls only the functions below. The first backend is bitsandbytes (``pip install
'curlora[quant]'``; ``bitsandbytes.py``), which runs the same modules on CPU and on CUDA GPUs:

* ``"int8"``: ``bnb.nn.Linear8bitLt`` (LLM.int8(), row-wise absmax int8 weights);
* ``"nf4"`` / ``"fp4"``: ``bnb.nn.Linear4bit`` (QLoRA's 4-bit NormalFloat / 4-bit float, one
  absmax per 64 weights; ``double_quant=True`` quantizes those absmax values too).

``quantize_model(model, "nf4")`` swaps every ``nn.Linear`` (except ``lm_head`` by default) for
its quantized counterpart in place. Models loaded with transformers'
``BitsAndBytesConfig`` hold the same module types, so CURLoRA adapts them as well.

CURLoRA never changes a quantized weight: C and R are cut from the dequantized weight
(``dequantized_weight``, out × in, float32; sampling probabilities are float32 as always) and
stored in the layer's compute dtype, U is float32, and the quantized tensors stay
bit-identical through training, saving and loading. Merging needs a new weight, so it happens
only in ``merge_and_unload(requantize=...)`` (see ``merge_quantized``).

Recognising a layer imports no library: a model without quantized layers never imports
bitsandbytes through curlora.
"""

from curlora.quantization.backend import QuantizationBackend
from curlora.quantization.bitsandbytes import quiet_bitsandbytes_import
from curlora.quantization.registry import (
    backend_for_scheme,
    backend_of,
    compute_dtype,
    dequantize_model,
    dequantized_weight,
    is_quantized_linear,
    merge_quantized,
    quantization_scheme,
    quantize_model,
    quantized_weight_bytes,
    register_backend,
    require_scheme,
    schemes,
)

#: The schemes of the built-in backends (``schemes()`` also lists any registered later).
SCHEMES: tuple[str, ...] = schemes()

__all__ = [
    "SCHEMES", "QuantizationBackend", "backend_for_scheme", "backend_of", "compute_dtype",
    "dequantize_model", "dequantized_weight", "is_quantized_linear", "merge_quantized",
    "quantization_scheme", "quantize_model", "quantized_weight_bytes", "quiet_bitsandbytes_import",
    "register_backend", "require_scheme", "schemes",
]
