"""The one base class of errors caused by bad user input (arguments, data, checkpoints, recipes, tool inputs).

Every module's specific error derives from :class:`UserError`, so an entry point (main.py, launch.py, multiproc.py,
the tools) catches this one type, prints ``error: <message>`` and exits with :data:`EXIT_BAD_INPUT`. It lives in a
module of its own, importing nothing, so that dataloading/, the launcher and the tools can use it without importing
the rest. The operator library (``pedconv``) stays independent: its argument errors are plain ``ValueError``s, which
the training code turns into a :class:`UserError` where user input reached them.

A ``ValueError`` subclass, so code (and tests) that caught the specific errors as ValueErrors still do.
"""

EXIT_BAD_INPUT = 2


class UserError(ValueError):
    """Bad user input; the message says what is wrong (one line, except a checkpoint mismatch's key lists)."""
