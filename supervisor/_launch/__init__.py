"""The `trainsup` console script's first stop, installed as the top-level package
`trainsup_launch` (see pyproject.toml).

supervisord's PyPI package is also imported as `supervisor`. If it shadows ours, importing
`supervisor.cli` would die with a bare ModuleNotFoundError; this says what happened instead.
"""

import sys


def main() -> int:
    try:
        import supervisor
    except ImportError:
        supervisor = None
    if supervisor is None or not getattr(supervisor, "_trainsup_marker", False):
        where = getattr(supervisor, "__file__", None) or "nowhere"
        sys.stderr.write(
            f"trainsup: the Python package 'supervisor' imported from {where} is not trainsup's "
            f"(supervisord uses the same import name); install trainsup in its own virtualenv "
            f"or with pipx\n")
        return 2
    from supervisor.cli import main as cli_main
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
