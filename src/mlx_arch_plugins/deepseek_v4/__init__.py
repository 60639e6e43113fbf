"""DeepSeek-V4 (``model_type: deepseek_v4``): model, caches, checkpoints, chat and tools."""
