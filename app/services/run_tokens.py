"""Run tokens: the fence every queue delivery of a job carries (jobs issues them, recovery renews them).

Its own module so that ``jobs`` and ``recovery`` both import it and neither imports the other for it.
"""

import secrets


def new_run_token() -> str:
    """A fresh token for one queue delivery of a job."""
    return secrets.token_hex(16)
