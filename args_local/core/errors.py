"""Errors that the front ends turn into one clear sentence and an exit code, never a traceback."""


class ArgsLocalError(Exception):
    """A failure the user can act on; the message names the problem and the fix."""

    exit_code = 1


class SettingsError(ArgsLocalError, ValueError):
    """A setting with a value outside its type or bounds (a usage error: exit code 2).
    ``setting`` names it, so that each front end can point at its own spelling (a flag,
    a JSON field)."""

    exit_code = 2

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


class ModelError(ArgsLocalError):
    """A policy or reward model that is missing, corrupt, or does not fit its manifest."""


class PromptError(ArgsLocalError):
    """A prompt that cannot be run: empty, not UTF-8, or longer than the context window."""


class RewardError(ArgsLocalError):
    """The reward model gave no usable score during decoding."""


class UsageError(ArgsLocalError):
    """A command used in a way it cannot work (an output file that is the input): exit code 2."""

    exit_code = 2


class ServerError(ArgsLocalError):
    """A policy server that cannot be reached, refuses a request, or answers without what ARGS
    needs (log-probabilities keyed by token id)."""
