"""Why an upload cannot become a model input; each message is written for the user.

A leaf module: the decoders, the preprocessing, the app's error handlers and the
training scripts all raise or catch these, and it imports nothing of ours.
"""


class ImageError(ValueError):
    """An input that cannot be turned into a model input."""


class UnsupportedImageError(ImageError):
    """Not an image in any format we read (HTTP 415)."""


class InvalidImageError(ImageError):
    """An image format we read, but a file or picture we refuse (HTTP 400)."""


class ImageTooLargeError(ImageError):
    """More pixels than the configured limit: a decompression bomb or a scan (HTTP 413)."""


class UnreadableFileError(InvalidImageError):
    """A reader failed on a malformed file in a way of its own (HTTP 400).

    ``cause`` names the failure's class for the server's log: never the file's bytes,
    which a traceback's message could carry.
    """

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause
