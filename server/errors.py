"""One place that turns failures into OpenAI's error JSON: {"error": {message, type, param, code}}."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from samplers import InvalidRequest

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """An error answered to the client; `code` is the HTTP status, as vLLM's server sends it."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.status,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def from_exception(exc: Exception) -> APIError:
    """The client-facing error for an exception raised while serving; never a stack trace."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequest):
        return bad_request(str(exc), exc.param)
    logger.exception("Internal error while serving a request", exc_info=exc)
    return APIError(500, f"Internal server error ({type(exc).__name__}); see the server log.")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":
        return bad_request("The request body is not valid JSON.")
    # A field with a union type fails once per member, each location ending in the member's type
    # name; the field itself is the part those locations share.
    location = tuple(first.get("loc", ()))
    for error in errors[1:]:
        other = tuple(error.get("loc", ()))
        if other[:2] == location[:2]:
            shared = next((i for i, (a, b) in enumerate(zip(location, other)) if a != b), None)
            location = location[:shared] if shared is not None else location
    param = ".".join(str(part) for part in location if part != "body") or None
    message = first.get("msg", "Invalid request")
    return bad_request(f"{param}: {message}" if param else message, param)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status < 500:  # 503s repeat while loading; a dead engine is logged where it dies
            logger.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return exc.response()

    @app.exception_handler(InvalidRequest)
    async def _invalid(request: Request, exc: InvalidRequest) -> JSONResponse:
        return from_exception(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()
