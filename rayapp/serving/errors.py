"""Errors a person deploying a model can act on."""

from __future__ import annotations

from rayapp.errors import UserError


class DeployError(UserError, RuntimeError):
    """A deployment that cannot start as asked, with what to change."""
