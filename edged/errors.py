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
