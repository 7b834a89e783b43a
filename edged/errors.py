"""One exception hierarchy. Every error a user can see carries a stable `code`
(used in error frames of the socket and MQTT APIs) and a one-line message."""

from __future__ import annotations


class EdgedError(Exception):
    code = "internal_error"

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, **self.details}


class ModelNotFound(EdgedError):
    code = "model_not_found"


class ModelCorrupt(EdgedError):
    code = "model_corrupt"


class ConversionError(EdgedError):
    code = "conversion_failed"


class QualityGateFailed(ConversionError):
    code = "quality_gate_failed"


class MissingExtra(EdgedError):
    code = "missing_extra"


class RequestError(EdgedError):
    """The request itself is wrong: bad field, bad type, bad option."""

    code = "invalid_request"


class ContextOverflow(RequestError):
    code = "context_length_exceeded"


class TemplateError(RequestError):
    code = "template_error"


# -- serving (edged/serve, edged/transports) ------------------------------------


class ConfigError(EdgedError):
    """A configuration file or environment override is wrong; names the key and the file."""

    code = "config_error"


class MalformedRequest(RequestError):
    """Not valid JSON, not an object, or a frame field of the wrong type."""

    code = "malformed_request"


class UnknownOperation(RequestError):
    code = "unknown_op"


class PayloadTooLarge(RequestError):
    code = "payload_too_large"


class Busy(EdgedError):
    """The queue is full (or the admission hook said no): retry after `retry_after_ms`."""

    code = "busy"


class TooManyConnections(Busy):
    """The socket's connection cap (in total or for the peer's uid) is reached; the
    connection is closed after this frame."""

    code = "too_many_connections"


class IdleTimeout(EdgedError):
    """The socket closed a connection that had no request in progress for too long."""

    code = "idle_timeout"


class LineTimeout(RequestError):
    """The socket closed a connection that started a line and did not finish it in time."""

    code = "line_timeout"


class Unavailable(EdgedError):
    """A part the request needs (the request journal) failed; retry later."""

    code = "unavailable"


class DeadlineExceeded(EdgedError):
    code = "deadline_exceeded"


class Cancelled(EdgedError):
    code = "cancelled"


class ShuttingDown(EdgedError):
    code = "shutting_down"


class PermissionDenied(EdgedError):
    code = "permission_denied"


class ReplyTopicRefused(PermissionDenied):
    """The reply topic is outside the configured reply patterns (docs/protocol.md)."""

    code = "reply_topic_refused"


class DuplicateRequest(RequestError):
    code = "duplicate_request"
