"""mlx-arch-plugins: architectures for stock mlx-lm, served as plugins.

Importing this package is cheap (stdlib only): the start-up file imports it in every
interpreter of the environment.
"""

__version__ = "0.1.0"

from .host.hook import PluginImportError, install, uninstall

__all__ = ["PluginImportError", "install", "uninstall", "__version__"]
