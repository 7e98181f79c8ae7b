"""The one error type of the converters: bad input, explained in one line."""


class ConversionError(ValueError):
    """A checkpoint, its arguments or the command line cannot be converted; the message says
    which field or file is at fault and what to do about it. The CLI prints it as one line."""
