"""Checkpoint formats.

* ``safetensors_shim``: wraps ``mlx.core.load`` (installed when ``mlx_lm.utils``
  is imported) so shards with dtypes the installed mlx rejects (F8_E8M0 on
  mlx 0.31, F8_E5M2, F4, F64) still load; also checks every header against the
  file size first.
* ``deepseek_v4_checkpoint``: DeepSeek-V4 official/MLX tensors -> model parameters.
"""
