"""Errors the mocked guest raises, each with a message a user can act on."""

from __future__ import annotations


class GuestError(Exception):
    """Base of every error the mocked guest raises on purpose."""


class ConfigError(GuestError):
    """Options that cannot work together (sizes, capacity, queue size...)."""


class FrontendError(GuestError):
    """The vhost-user conversation with the back-end failed."""


class ConnectError(FrontendError):
    """The back-end's socket could not be reached."""


class BackendClosedError(FrontendError):
    """The back-end closed the connection."""


class ReplyTimeoutError(FrontendError):
    """The back-end did not answer in time."""


class BadReplyError(FrontendError):
    """The back-end sent a reply the front-end cannot accept."""


class NackError(FrontendError):
    """The back-end acknowledged a request with a non-zero status."""

    def __init__(self, request_name: str, status: int) -> None:
        self.request_name = request_name
        self.status = status
        super().__init__(f"the back-end refused {request_name} (ack status {status})")


class DriverError(GuestError):
    """The device misbehaved from the driver's point of view."""


class ReportTimeoutError(DriverError):
    """A report was not returned (used) in time."""
