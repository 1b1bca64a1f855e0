"""loratune: LoRA fine-tuning for Hugging Face language models, PEFT-compatible.

    from loratune import LoraConfig, get_peft_model, TaskType, PeftModel
"""

from .config import LoraConfig, TaskType
from .model import LoraModel, PeftModel, PeftModelForCausalLM, get_peft_model

__version__ = "0.1.0"

__all__ = ["LoraConfig", "LoraModel", "PeftModel", "PeftModelForCausalLM", "TaskType", "get_peft_model"]
