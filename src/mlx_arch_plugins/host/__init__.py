"""The generic plugin host: import finder, patches of stock mlx-lm, doctor and CLI.

Nothing here names an architecture. What the host needs from one (tokenizer defaults,
cache classes, checkpoint hooks) it reads from the module registered for it in the
``mlx_arch_plugins.models`` entry-point group. Importing this package is stdlib-only: the
start-up file imports ``host.hook`` in every interpreter.
"""
