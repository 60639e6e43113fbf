"""``mlx_lm.models.cache``: prompt-cache files of plugin caches load.

Stock ``load_prompt_cache`` looks each cache class up by name among the module's
globals. A plugin lists its cache classes in ``CACHE_CLASSES``; they are added to the
module before a file is read (importing the plugins only then, never at start-up) and
whenever a plugin model is loaded (``host.patches.utils``).
"""

import functools

from .. import plugins
from . import patching


def register(cache_module, plugin_module) -> None:
    for cls in plugins.declared(plugin_module, "CACHE_CLASSES", ()):
        patching.add(cache_module, cls.__name__, cls)


def register_all(cache_module) -> None:
    for module in plugins.imported_modules():
        register(cache_module, module)


def _make_load_prompt_cache(original, cache_module):
    @functools.wraps(original)
    def load_prompt_cache(*args, **kwargs):
        register_all(cache_module)
        return original(*args, **kwargs)

    return load_prompt_cache


def apply(cache_module) -> None:
    patching.replace(
        cache_module,
        "load_prompt_cache",
        lambda original: _make_load_prompt_cache(original, cache_module),
    )


def undo() -> None:
    patching.undo(__name__)
