"""The one error type of the clip package."""


class LoadError(ValueError):
    """A model name, checkpoint file or state dict that cannot be loaded; the message names the culprit."""
