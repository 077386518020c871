"""Typed job configs. ``load_job(path, overrides)`` returns the config for the file's ``kind``."""

from rayapp.config.loader import JOB_KINDS, ConfigError, dump_config, explain, load_job, load_job_dict

__all__ = ["JOB_KINDS", "ConfigError", "dump_config", "explain", "load_job", "load_job_dict"]
