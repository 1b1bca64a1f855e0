"""loratune: LoRA fine-tuning for Hugging Face language models, PEFT-compatible.

    from loratune import LoraConfig, get_peft_model, TaskType, PeftModel

Where things live:

  core (this package's top level: what PEFT's API and file format need, nothing else)
    config        LoraConfig and TaskType, PEFT's fields and defaults
    layers/       LoRA wrappers around frozen base layers, and modules_to_save copies
    inject        resolve target_modules and put LoRA layers into a model
    model         LoraModel / PeftModel: PEFT's API on the wrapped model
    merge         weighted adapter combinations and the safe_merge check
    adapter_io    adapters on disk in PEFT's exact format
    dtypes        dtype names, bf16 support, "auto" resolution
    errors        the exceptions raised at boundaries
    atomic        directories and files that appear complete or not at all (and a full disk named)
    module_patterns  user regexes over module names, matched in bounded time
    memory        free memory, and refusing an adapter that cannot fit before allocating it
  tools/          around the core: load base models and trained adapters, generate, evaluate,
                  export merged models (HF directories, GGUF) and GGUF adapters for llama.cpp/Ollama,
                  inspect adapters, check vLLM/LoRAX/llama.cpp acceptance
  data/           read rows, detect formats, tokenize with loss masks, batch and collate
  train/          the trainer: config, loop, loss, optimizer, checkpoints, `run`
  serve/          one base and many adapters behind an OpenAI-compatible API
  quant/          quantized frozen bases for QLoRA (NF4/FP4, int8, bitsandbytes)
  ops/            fast kernels for training, each beside its reference
  cli/            one file per verb; the only place that prints, reads argv or exits

Imports flow one way: core <- data <- train <- cli and core <- serve <- cli. tools/ uses the core,
data/ and quant/ (and tools.evaluation the trainer's loss, train.loss) and is used by train/, serve/
and cli/; the core imports none of the others.
"""

from .config import LoraConfig, TaskType
from .model import LoraModel, PeftModel, PeftModelForCausalLM, get_peft_model

__version__ = "0.1.0"

__all__ = ["LoraConfig", "LoraModel", "PeftModel", "PeftModelForCausalLM", "TaskType", "get_peft_model"]
