"""Errors that mean the user asked for something impossible.

`launch.py` prints a `UserError` as one line on stderr and exits with status 2,
without a traceback: the message must say what is wrong and how to fix it.
"""


class UserError(Exception):
  """Bad user input; the message is one line saying what is wrong and how to fix it."""
