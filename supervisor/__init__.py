"""trainsup: a preemption-tolerant supervisor for long training runs.

The source folder is `supervisor/`; it is installed and imported as `trainsup` (see
pyproject.toml), so it never shadows supervisord's own `supervisor` package.
"""

__version__ = "0.1.0"
