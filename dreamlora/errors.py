"""Errors a user can cause, each carrying a message that says what was wrong and how to fix it."""


class DreamloraError(Exception):
    """Base class; the CLI turns it into a red panel and an exit code without a traceback."""

    exit_code = 1


class ConfigError(DreamloraError):
    """A setting, flag or config file is invalid."""

    exit_code = 2


class DataError(DreamloraError):
    """An instance or class image folder, or an image in it, cannot be used."""

    exit_code = 2


class ModelLoadError(DreamloraError):
    """The base model cannot be found or loaded."""

    exit_code = 2


class ExportError(DreamloraError):
    """A run or LoRA file cannot be exported, converted or verified."""

    exit_code = 2


class TrainingError(DreamloraError):
    """Training failed at run time (non-finite loss, missing gradients, out of memory)."""

    exit_code = 1


class TrainingInterrupted(DreamloraError):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint; the run continues with --resume."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number  # the shell convention: 130 for Ctrl-C, 143 for SIGTERM
