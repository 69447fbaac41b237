"""Job YAML and daemon config -> validated specs (trainsup.spec), with FILE:LINE errors.

Four layers, bottom to top: yaml.py reads YAML into nodes that keep their line numbers
(and holds the limits); values.py parses one value (durations, sizes, signals, users,
cron); schema.py maps each key of each section to its parser; files.py turns files and
directories into specs. Every problem becomes one line `FILE:LINE: KEY: what is wrong`;
all of them are collected. What other rooms use is named here.
"""

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

__all__ = ["ConfigError", "JobsDirScan", "SETTLE_SECONDS", "UNIX_SOCKET_PATH_MAX", "default_config_path",
           "default_socket", "default_state_dir", "discover_config", "load_daemon_config", "load_job_file",
           "load_jobs_dir", "scan_job_file", "scan_jobs_dir", "validate_files"]
