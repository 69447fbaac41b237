"""Job YAML and daemon config -> validated specs (trainsup.spec), with FILE:LINE errors.

Four layers, bottom to top: yaml.py reads YAML into nodes that keep their line numbers
(and holds the limits); values.py parses one value (durations, sizes, signals, users,
cron); schema.py maps each key of each section to its parser; files.py turns files and
directories into specs. Every problem becomes one line `FILE:LINE: KEY: what is wrong`;
all of them are collected. What other rooms use is named here, and loaded on first use:
the CLI parses a duration without loading the schema.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .files import (
        JobsDirScan,
        default_config_path,
        default_socket,
        default_state_dir,
        discover_config,
        load_daemon_config,
        load_job_file,
        load_jobs_dir,
        scan_job_file,
        scan_jobs_dir,
        validate_files,
    )
    from .yaml import SETTLE_SECONDS, UNIX_SOCKET_PATH_MAX, ConfigError

_WHERE = {
    **dict.fromkeys(("JobsDirScan", "default_config_path", "default_socket", "default_state_dir",
                     "discover_config", "load_daemon_config", "load_job_file", "load_jobs_dir",
                     "scan_job_file", "scan_jobs_dir", "validate_files"), "files"),
    **dict.fromkeys(("SETTLE_SECONDS", "UNIX_SOCKET_PATH_MAX", "ConfigError"), "yaml"),
}
__all__ = ["ConfigError", "JobsDirScan", "SETTLE_SECONDS", "UNIX_SOCKET_PATH_MAX", "default_config_path",
           "default_socket", "default_state_dir", "discover_config", "load_daemon_config", "load_job_file",
           "load_jobs_dir", "scan_job_file", "scan_jobs_dir", "validate_files"]


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value
