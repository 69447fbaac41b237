"""trainsup: a preemption-tolerant supervisor for long training runs.

The import name `supervisor` is shared with supervisord's PyPI package; `_trainsup_marker`
lets the CLI say clearly when the wrong one is imported.
"""

__version__ = "0.1.0"
_trainsup_marker = True
