"""The dataset error type (a module of its own so that the command line can import it without numpy or Pillow)."""


class DatasetError(ValueError):
    """Bad dataset input; the one-line message starts with the offending path or value."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
