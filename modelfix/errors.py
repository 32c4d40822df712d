"""The errors a user can cause. The CLI prints each as one line and exits with its code."""

from __future__ import annotations


class ModelfixError(Exception):
    """Bad usage or bad input: one clear line naming the file or option and the fix; exit code 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class CheckpointError(ModelfixError):
    """A checkpoint that cannot be read, is unsafe to read, or lacks what is needed to rebuild the model."""


class ArchitectureMismatch(ModelfixError):
    """A state dict whose keys or shapes do not fit the named architecture."""


class DataError(ModelfixError):
    """A data folder, bundle, idx file or scenario that cannot be used as given."""


class ArtifactSpecError(ModelfixError):
    """An artifact spec (text or YAML) that does not parse."""


class UnsupportedModel(ModelfixError):
    """A model or layer a method cannot handle."""


class TrainingFailed(ModelfixError):
    """The run itself failed (for example a NaN loss): exit code 1, not a usage error."""

    exit_code = 1


class ModelfixWarning(UserWarning):
    """Something the user should see but that does not stop the run (data far outside the card's value range); the
    CLI prints each as one `warning:` line."""
