"""The models, free of any training loop: the frozen LLM text encoder and its tokenizer, the
query adapter, the PromptEncoder backbone (LLM + adapter) every stage and tool shares, the
base's CLIP teacher, the diffusion parts and losses, and freezing."""
