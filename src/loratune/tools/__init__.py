"""Tools around the LoRA core: load models, generate, score, export and inspect adapters.

  loading        a frozen base model and its tokenizer from a preset, a local directory or a hub id
  load_trained   a base plus a saved adapter, set up as it was trained (for generate/chat/eval/merge)
  generation     prompts in, new text out (greedy or seeded sampling), and the chat history
  evaluation     loss and perplexity on a data file, masked exactly as the trainer masks it
  export         merge an adapter into its base and write a checked Hugging Face model directory
  gguf           models and LoRA adapters as GGUF files, laid out as llama.cpp's converters do
  gguf_vocab     the tokenizer keys of a GGUF model
  gguf_export    GGUF export and merge into a new directory, with an Ollama Modelfile
  ollama         Modelfiles (chat templates as Go templates) and llama.cpp command lines
  inspection     what an adapter directory holds, read from its files alone
  acceptance     whether vLLM, LoRAX or llama.cpp would serve an adapter, by their own rules

Nothing in the core (the modules at the package top level) imports from here. These modules use
the core, `loratune.data` and `loratune.quant`; `evaluation` also scores with the trainer's loss
(`loratune.train.loss`, which itself needs only `data` and `ops`). Nothing here prints: the
`cli/` verbs do.
"""
