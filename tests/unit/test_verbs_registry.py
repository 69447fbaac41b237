"""One registry of verbs: the control allow-list, the dispatcher and the CLI derive from it."""

from __future__ import annotations

import argparse

from trainsup.cli import main as cli
from trainsup.control import server as control
from trainsup.control import verbs
from trainsup.daemon.handlers import Commands


def test_every_verb_has_a_handler_a_printer_and_a_subcommand():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, verb in verbs.VERBS.items():
        assert callable(getattr(Commands, verb.handler, None)), f"daemon/handlers.py lacks {verb.handler}"
        if name != "ping":
            assert name in sub.choices, f"the CLI has no `{name}`"
            assert name in cli.COMMANDS, f"cli.COMMANDS has no printer for `{name}`"


def test_the_cli_sends_what_the_registry_says():
    ns = cli.build_parser().parse_args(["preempt", "--all", "--grace", "5m"])
    assert verbs.request_of(verbs.VERBS["preempt"], ns) == (None, {"all": True, "grace": 300.0})
    ns = cli.build_parser().parse_args(["logs", "j", "-f", "-n", "7"])
    assert verbs.request_of(verbs.VERBS["logs"], ns) == ("j", {"follow": True, "n": 7})
    ns = cli.build_parser().parse_args(["status", "--json"])
    assert verbs.request_of(verbs.VERBS["status"], ns) == (None, {})


def test_the_socket_knows_exactly_the_registrys_verbs():
    assert control.VERBS is verbs.VERBS
    assert verbs.VERBS["logs"].streams({"follow": True}) and not verbs.VERBS["logs"].streams({})
