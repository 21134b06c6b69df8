"""OpenAI's error object, `{"error": {"message", "type", "param", "code"}}`, and the status each failure gets."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

INVALID = "invalid_request_error"  # OpenAI's type for 400 / 404 / 413 answers


class APIError(Exception):
    """A request the server answers with an error object (raised anywhere, rendered by the app's handler)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = INVALID, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_param(param: str | None, message: str, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """pydantic's first complaint as a 400 that names the parameter (malformed JSON: code invalid_json)."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(),
                        None, "invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    # drop pydantic's union branch names ("str", "list[...]", "function-after[...]") from the path
    param = ".".join(p for p in loc if not (p.endswith("]") or p in ("str", "int", "float", "bool", "list")))
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unsupported parameter {param!r}", param, "unsupported_parameter")
    if first.get("type") == "missing":
        return APIError(400, f"missing required parameter {param!r}", param, "missing_required_parameter")
    return APIError(400, f"invalid {param or 'request'}: {first.get('msg', 'invalid value')}", param or None,
                    "invalid_value")


def unauthorized() -> APIError:
    return APIError(401, "missing or incorrect API key: send it as 'Authorization: Bearer KEY'", None,
                    "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the server's limit of {limit / 2**20:g} MiB "
                    "(gemma3-serve --max-body-mb)", None, "request_too_large")
