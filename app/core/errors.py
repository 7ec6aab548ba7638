"""Domain errors raised by services, mapped to an HTTP status and a message in one place (app.main)."""


class StudioError(Exception):
    """Base class: a problem a person can act on, with the HTTP status that says what kind."""

    status_code = 400

    def __init__(self, message: str, *, field: str | None = None, row: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.row = row

    def to_dict(self) -> dict[str, object]:
        """The JSON body of the error response."""
        body: dict[str, object] = {"detail": self.message}
        if self.field is not None:
            body["field"] = self.field
        if self.row is not None:
            body["row"] = self.row
        return body


class NotFound(StudioError):
    status_code = 404


class InvalidDataset(StudioError):
    status_code = 422


class InvalidSpec(StudioError):
    status_code = 422


class PayloadTooLarge(StudioError):
    status_code = 413


class Conflict(StudioError):
    status_code = 409


class JobStateError(StudioError):
    status_code = 409


class ServiceUnavailable(StudioError):
    status_code = 503


class Unauthorized(StudioError):
    """No valid credentials: JSON callers get 401, browsers are sent to the login page."""

    status_code = 401


class Forbidden(StudioError):
    """Signed in, but not allowed (admin-only actions, a missing CSRF token)."""

    status_code = 403


class TooManyJobs(StudioError):
    status_code = 429
