"""One function that removes credentials from text: `redact`. Every log line of the "pirl"
logger (a filter installed here, which also escapes control characters in logged values), every error message the commands print, and every text file
that can hold a URL (config dumps, checkpoints' config, benchmark reports) go through it.

It removes the `user:password@` part of URLs, and every credential seen in a URL opened by
pirl.storage (`remember_url`) wherever it appears later: a backend may quote it without the
`//` around it (s3fs takes `s3://KEY:SECRET@bucket` for a bucket name, and botocore's error
message quotes that name).
"""

from __future__ import annotations

import logging
import re

MASK = "***"
_USERINFO = re.compile(r"//[^/@\s'\"]*@")
_URL_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/@\s]+)@")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MIN_SECRET_LENGTH = 4  # shorter strings would mask ordinary words
_MIN_KEY_ID_LENGTH = 16  # AWS access key ids have 20 characters
_secrets: set[str] = set()


def remember_url(url: str) -> None:
    """Remember the credentials of `url` (its user:password@ part), so that `redact` masks them
    wherever they appear."""
    match = _URL_USERINFO.match(url)
    if match:
        userinfo = match.group(1)
        user, _, password = userinfo.partition(":")
        _secrets.update(p for p in (userinfo, password) if len(p) >= _MIN_SECRET_LENGTH)
        if len(user) >= _MIN_KEY_ID_LENGTH:  # an access key id; a short user name is a word
            _secrets.add(user)


def redact(text: str) -> str:
    """`text` without the user:password@ parts of URLs and without any remembered credential."""
    text = _USERINFO.sub("//", text)
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def escape_controls(value):
    """A string value with its control characters escaped (a newline in a logged value would
    otherwise forge a log line); other values as they are."""
    if isinstance(value, str) and _CONTROL.search(value):
        return _CONTROL.sub(lambda m: repr(m.group())[1:-1], value)
    return value


class RedactingFilter(logging.Filter):
    """Before any handler sees a record: escapes control characters in its arguments, then
    redacts the message with its arguments formatted in."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(escape_controls(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: escape_controls(v) for k, v in record.args.items()}
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


logging.getLogger("pirl").addFilter(RedactingFilter())
