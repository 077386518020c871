"""Typed job configs. ``load_job(path, overrides)`` returns the config for the file's ``kind``
(the kinds and their config classes: :mod:`rayapp.kinds`)."""

from rayapp.config.loader import (
    ConfigError,
    dump_config,
    explain,
    load_job,
    load_job_dict,
    write_resolved_config,
)

__all__ = ["ConfigError", "dump_config", "explain", "load_job", "load_job_dict", "write_resolved_config"]
