"""The one error type of the checkpoint package."""

from __future__ import annotations

from deepseek_jax.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read, written or used as asked: the message names the path
    (and the tensor, step or config key) and, where there is one, the fix."""
