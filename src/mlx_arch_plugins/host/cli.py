"""Command line: ``mlx-arch-plugins`` and ``python -m mlx_arch_plugins``."""

import argparse
import importlib
import sys

# The architecture `make-tiny` and `demo` build (the host's one architecture name).
DEFAULT_ARCHITECTURE = "deepseek_v4"

# Sub-commands that live in their own modules: imported only when asked for. None: the
# default architecture's tiny builder (its model module's TINY_BUILDER).
DELEGATED = {
    "make-tiny": (None, f"write a tiny random {DEFAULT_ARCHITECTURE} checkpoint"),
    "demo": ("mlx_arch_plugins.host.demo", "run the end-to-end demo"),
}


def tiny_builder_name(architecture: str = DEFAULT_ARCHITECTURE) -> str:
    """Module name of the architecture's tiny checkpoint builder."""
    from . import plugins

    module = importlib.import_module(plugins.registered_module_name(architecture))
    return module.TINY_BUILDER


def tiny_builder(architecture: str = DEFAULT_ARCHITECTURE):
    return importlib.import_module(tiny_builder_name(architecture))


def _parser():
    parser = argparse.ArgumentParser(
        prog="mlx-arch-plugins",
        description="Architectures for stock mlx-lm, served as plugins.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    doctor = sub.add_parser("doctor", help="show whether the plugin host works here, and why")
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.add_argument(
        "--selftest",
        action="store_true",
        help="also run each architecture's self-check on this machine's default device "
        "(a tiny shipped checkpoint against reference logits); exit 1 if one fails",
    )
    for name, (module, text) in DELEGATED.items():
        sub.add_parser(name, help=f"{text} (options: {name} --help)", add_help=False)
    return parser


def _delegate(command, argv):
    module_name, _ = DELEGATED[command]
    try:
        module_name = module_name or tiny_builder_name()
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(
            f"mlx-arch-plugins: the {command!r} command is not available in this "
            f"installation (module {module_name} is missing)",
            file=sys.stderr,
        )
        return 2
    main = getattr(module, "main", None)
    if not callable(main):
        print(f"mlx-arch-plugins: {module_name} has no main(argv)", file=sys.stderr)
        return 2
    return main(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        # Everything after the command name belongs to that command's own parser.
        return _delegate(argv[0], argv[1:]) or 0
    args = _parser().parse_args(argv)
    if args.command == "doctor":
        from . import doctor

        return doctor.main(as_json=args.json, selftest=args.selftest)
    _parser().print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
