raise RuntimeError("toy plugin fails on purpose")
