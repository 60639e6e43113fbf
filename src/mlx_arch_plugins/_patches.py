"""Post-import patches for stock mlx-lm (filled in by the lead)."""


def on_import(name, module):
    pass
