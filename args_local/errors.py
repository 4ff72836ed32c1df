"""Errors that the CLI turns into one clear sentence and an exit code, never a traceback."""


class ArgsLocalError(Exception):
    """A failure the user can act on; the message names the problem and the fix."""

    exit_code = 1


class ModelError(ArgsLocalError):
    """A policy or reward model that is missing, corrupt, or does not fit its manifest."""


class PromptError(ArgsLocalError):
    """A prompt that cannot be run: empty, not UTF-8, or longer than the context window."""


class RewardError(ArgsLocalError):
    """The reward model gave no usable score during decoding."""
