"""Plugin host: makes registered modules importable under the names mlx-lm asks for.

Stock mlx-lm finds an architecture by importing ``mlx_lm.models.<model_type>``, a chat
template by importing ``mlx_lm.chat_templates.<name>`` and a tool parser by importing
``mlx_lm.tool_parsers.<name>``. Two meta-path finders make plugins visible there:

* ``PluginFinder`` (appended last, so stock modules always win) serves a missing name from
  the entry-point groups in ``GROUPS``. The served module *is* the plugin's own module.
* ``PostImportFinder`` (first in ``sys.meta_path``) reacts only to the names in
  ``PATCHED``; it lets the other finders locate the stock module and, once that module has
  executed, calls ``mlx_arch_plugins._patches.on_import(name, module)``.

This module is imported by the start-up file of every interpreter in the environment, so it
imports nothing beyond ``os`` and ``sys`` until an mlx-lm import needs it, and start-up
never raises.
"""

import os
import sys

# mlx-lm package searched by mlx-lm -> entry-point group that can fill it.
GROUPS = {
    "mlx_lm.models": "mlx_arch_plugins.models",
    "mlx_lm.chat_templates": "mlx_arch_plugins.chat_templates",
    "mlx_lm.tool_parsers": "mlx_arch_plugins.tool_parsers",
}

# Stock modules that get the post-import callback, in dependency order (install() calls
# the callback in this order for modules that were imported before it ran).
PATCHED = (
    "mlx_lm.models.base",
    "mlx_lm.models.cache",
    "mlx_lm.tokenizer_utils",
    "mlx_lm.utils",
    "mlx_lm.generate",
    "mlx_lm.convert",
    "mlx_lm.server",
)
_PATCHED_SET = frozenset(PATCHED)

DISABLE_ENV = "MLX_ARCH_PLUGINS_DISABLE"
ALLOW_ENV = "MLX_ARCH_PLUGINS"

_entries = None  # group -> {name: [EntryPoint, ...]}; filled on the first miss
_notified = set()  # PATCHED names whose callback ran since install()
_aliases = set()  # alias names this host put into sys.modules
_installed_by = None  # "start-up file" or "install()"


class PluginImportError(ImportError):
    """A registered plugin module could not be imported (the cause is chained)."""

    __module__ = "mlx_arch_plugins"  # its public home, shown in tracebacks


def disabled_reason():
    """Why the host is off (a string), or None when it may run."""
    value = os.environ.get(DISABLE_ENV, "").strip().lower()
    if value and value not in ("0", "false", "no", "off"):
        return f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    return None


def allowlist():
    """Entry names allowed by MLX_ARCH_PLUGINS=a,b, or None when every name is allowed."""
    value = os.environ.get(ALLOW_ENV, "")
    names = frozenset(n.strip() for n in value.split(",") if n.strip())
    return names or None


def registered():
    """All registered entries: {group: {name: [EntryPoint, ...]}} (read once, then cached)."""
    global _entries
    if _entries is None:
        from importlib.metadata import entry_points

        found = {group: {} for group in GROUPS.values()}
        every = entry_points()
        for group, names in found.items():
            for ep in every.select(group=group):
                names.setdefault(ep.name, []).append(ep)
        _entries = found
    return _entries


def distribution_of(ep):
    """'name version' of the distribution that registered an entry point."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "an unknown distribution"
    return f"{dist.name} {dist.version}"


class _AliasLoader:
    """Hands out the plugin's real module under the alias name (no second import)."""

    def __init__(self, ep, alias):
        self.ep = ep
        self.alias = alias
        self._real_spec = None

    def create_module(self, spec):
        import importlib

        name = spec.name.rpartition(".")[2]
        try:
            module = importlib.import_module(self.ep.module)
        except Exception as e:
            raise PluginImportError(
                f"mlx-arch-plugins: plugin {name!r} for {spec.name} (module "
                f"{self.ep.module!r}, registered by {distribution_of(self.ep)}) failed "
                f"to import: {type(e).__name__}: {e}",
                name=spec.name,
            ) from e
        self._real_spec = module.__spec__
        return module

    def exec_module(self, module):
        # The import system stamped the alias spec on the module; give its own back so
        # reload(), pickling and relative imports keep using the real name.
        module.__spec__ = self._real_spec
        _aliases.add(self.alias)


# Set on both finders: another copy of this package in the same interpreter (an
# installed one and a source tree on sys.path) recognises them by it.
FINDER_MARK = "mlx_arch_plugins_finder"


class PluginFinder:
    """Serves mlx_lm.{models,chat_templates,tool_parsers}.<name> from entry points."""

    mlx_arch_plugins_finder = "plugin"

    def find_spec(self, fullname, path=None, target=None):
        parent, _, name = fullname.rpartition(".")
        group = GROUPS.get(parent)
        if group is None:
            return None
        allowed = allowlist()
        if allowed is not None and name not in allowed:
            return None
        eps = registered()[group].get(name)
        if not eps:
            return None
        from importlib.machinery import ModuleSpec

        if len(eps) > 1:
            who = ", ".join(sorted(distribution_of(ep) for ep in eps))
            raise PluginImportError(
                f"mlx-arch-plugins: {fullname} is registered by more than one "
                f"distribution ({who}); uninstall all but one",
                name=fullname,
            )
        ep = eps[0]
        if ep.module == fullname:
            return None  # a plugin pointing at the alias itself: nothing to serve
        origin = f"{ep.module} ({distribution_of(ep)})"
        return ModuleSpec(fullname, _AliasLoader(ep, fullname), origin=origin)

    def invalidate_caches(self):
        global _entries
        _entries = None


class _CallbackLoader:
    """Runs the real loader, then the post-import callback; looks like the real loader."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, attr):
        return getattr(self._loader, attr)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        loader = self._loader
        # The module keeps the real loader (inspect, resources and reload look at it).
        module.__loader__ = loader
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = loader
        loader.exec_module(module)
        _notify(module.__name__, module)


class PostImportFinder:
    """Wraps the loader of the stock modules in PATCHED; ignores every other import."""

    mlx_arch_plugins_finder = "post_import"

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _PATCHED_SET:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            # any copy's post-import finder would ask this one again: endless recursion
            if getattr(finder, FINDER_MARK, None) == "post_import" or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _CallbackLoader(spec.loader)
        return spec


def _notify(name, module):
    _notified.add(name)
    try:
        from mlx_arch_plugins.host import patches as _patches

        _patches.on_import(name, module)
    except Exception as e:
        import warnings

        warnings.warn(
            f"mlx-arch-plugins: post-import patch for {name} failed "
            f"({type(e).__name__}: {e}); {name} may run unpatched",
            RuntimeWarning,
            stacklevel=2,
        )


plugin_finder = PluginFinder()
post_import_finder = PostImportFinder()


def is_installed():
    return plugin_finder in sys.meta_path and post_import_finder in sys.meta_path


def install(_by="install()"):
    """Activate the host in this interpreter (idempotent). Returns False if disabled.

    Needed only where start-up files are skipped (``python -S``, embedded or frozen apps).
    """
    global _installed_by
    if disabled_reason():
        return False
    _drop_other_copies()
    if post_import_finder not in sys.meta_path:
        sys.meta_path.insert(0, post_import_finder)
    if plugin_finder not in sys.meta_path:
        sys.meta_path.append(plugin_finder)
    if _installed_by is None:
        _installed_by = _by
    for name in PATCHED:
        module = sys.modules.get(name)
        if module is not None and name not in _notified:
            _notify(name, module)
    return True


def _drop_other_copies():
    """Remove the finders another copy of this package installed (the copy whose
    ``install`` runs last serves the imports, so they run one copy's code)."""
    ours = (post_import_finder, plugin_finder)
    sys.meta_path[:] = [
        f for f in sys.meta_path if f in ours or getattr(f, FINDER_MARK, None) is None
    ]


def uninstall():
    """Remove both finders, drop served aliases and undo patches (idempotent)."""
    global _installed_by
    for finder in (post_import_finder, plugin_finder):
        while finder in sys.meta_path:
            sys.meta_path.remove(finder)
    _installed_by = None
    _notified.clear()
    for alias in list(_aliases):
        module = sys.modules.pop(alias, None)
        parent_name, _, child = alias.rpartition(".")
        parent = sys.modules.get(parent_name)
        if module is not None and getattr(parent, child, None) is module:
            delattr(parent, child)
    _aliases.clear()
    undo = getattr(sys.modules.get("mlx_arch_plugins.host.patches"), "undo_all", None)
    if callable(undo):
        try:
            undo()
        except Exception as e:
            import warnings

            warnings.warn(
                f"mlx-arch-plugins: undoing patches failed ({type(e).__name__}: {e})",
                RuntimeWarning,
                stacklevel=2,
            )


def status():
    """Whether the host is active in this interpreter, and why."""
    reason = disabled_reason()
    if reason:
        active = False
    elif is_installed():
        active, reason = True, f"active (installed by {_installed_by})"
    else:
        active = False
        reason = (
            "not installed: start-up files were not processed (python -S, embedded or "
            "frozen interpreter?); call mlx_arch_plugins.install()"
        )
    allowed = allowlist()
    return {
        "active": active,
        "reason": reason,
        "allowlist": sorted(allowed) if allowed is not None else None,
        "post_import_finder": post_import_finder in sys.meta_path,
        "plugin_finder": plugin_finder in sys.meta_path,
    }


def _startup():
    """Entry point of mlx_arch_plugins.pth / .start: must never break interpreter start."""
    try:
        install(_by="start-up file")
    except Exception:
        pass
