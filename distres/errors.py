"""User-facing errors.

Every mistake a user can make (bad flag, missing data, impossible batch split) raises
``UserError``; ``distres.train.main`` turns it into one line on stderr
(``distres: error: ...``) and exit status 2, without a traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""


EXIT_USER_ERROR = 2


def format_error(err: BaseException) -> str:
    # One line, always: a multi-line message would be cut by log scrapers and SLURM mails.
    return "distres: error: " + " ".join(str(err).split())
