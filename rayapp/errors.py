"""Errors that carry a message a person can act on; the CLI prints them without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Base for errors caused by the user's input (files, config, data, resources), not by a bug.

    Subclass it for any error whose message already says what was found and what to change.
    """


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, UserError)
