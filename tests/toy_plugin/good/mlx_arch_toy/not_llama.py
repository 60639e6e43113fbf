# Registered as "llama": stock mlx-lm has that name, so this must never be imported.
raise RuntimeError("mlx_arch_toy.not_llama was imported: a stock name was replaced")
