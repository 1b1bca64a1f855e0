"""PEFT's extra keyword arguments at loratune's entry points: ignored with a warning, or refused.

`get_peft_model`, `PeftModel.from_pretrained`, `load_adapter` and `save_pretrained` take PEFT's
keyword arguments, so PEFT code runs unchanged. Most change nothing in what loratune computes
(`low_cpu_mem_usage`, `ephemeral_gpu_offload`, `torch_device`, hub options, ...): a value other
than None, False or "auto" is ignored with a warning. The few in `REFUSED` would change the
result; a value other than their default is refused by name. `is_main_process` and
`safe_serialization` are handled by `save_pretrained` itself.
"""

from __future__ import annotations

import logging
from typing import Any

from .errors import UnsupportedFeatureError

logger = logging.getLogger(__name__)

_CONVERSION = "PiSSA/OLoRA adapters are saved as trained and reload as trained"
# name -> (the values that ask for nothing, why any other value is refused)
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "mixed": ((False,), "mixing adapter types (PEFT's PeftMixedModel) is not supported"),
    "autocast_adapter_dtype": ((True,), "adapter weights are always fp32"),
    "key_mapping": ((None, {}), "tensor keys are read exactly as PEFT writes them"),
    "path_initial_model_for_weight_conversion": ((None,), _CONVERSION),
    "convert_pissa_to_lora": ((None,), _CONVERSION),
}
INERT_VALUES = (None, False, "auto")  # any other argument at these values asks for nothing


def check_peft_kwargs(caller: str, kwargs: dict[str, Any]) -> None:
    """Refuse PEFT keyword arguments that would change the result; warn about ignoring the others.

    Raises:
        UnsupportedFeatureError: naming each refused argument, its value and why.
    """
    refused = [f"{name}={value!r} ({REFUSED[name][1]})" for name, value in kwargs.items()
               if name in REFUSED and not _asks_nothing(value, REFUSED[name][0])]
    if refused:
        raise UnsupportedFeatureError(f"{caller}: not supported: {'; '.join(refused)}")
    ignored = [f"{name}={value!r}" for name, value in kwargs.items()
               if name not in REFUSED and not _asks_nothing(value, INERT_VALUES)]
    if ignored:
        logger.warning("%s: ignoring %s (not supported by loratune)", caller, ", ".join(ignored))


def _asks_nothing(value: Any, inert: tuple[Any, ...]) -> bool:
    return any(value is off or (type(value) is type(off) and value == off) for off in inert)
