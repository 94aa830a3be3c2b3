"""The OpenAPI document of the HTTP API: FastAPI's, with the V2 bodies its routes read and write themselves.

The routes parse raw bodies and return plain responses (for speed), so FastAPI sees no request or response
model; this adds them, from the Open Inference Protocol's REST API, and the infer routes, which the data plane
serves outside FastAPI's routing. Errors are ``{"error": message}``; a request FastAPI rejects is a 400 here.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from engine.datatypes import V2_TO_NUMPY

INFER = "/v2/models/{model_name}/infer"
INFER_VERSION = "/v2/models/{model_name}/versions/{model_version}/infer"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


STRING, BOOLEAN, INTEGER = {"type": "string"}, {"type": "boolean"}, {"type": "integer"}
BINARY = {"type": "string", "format": "binary"}
SHAPE = {"type": "array", "items": INTEGER}
SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _object(["error"], error=STRING),
    "Parameters": {"type": "object"},
    "TensorMetadata": _object(["name", "datatype", "shape"], name=STRING, datatype=STRING, shape=SHAPE),
    "ServerMetadata": _object(
        ["name", "version", "extensions"], name=STRING, version=STRING, extensions={"type": "array", "items": STRING}
    ),
    "ModelMetadata": _object(
        ["name", "versions", "platform", "inputs", "outputs"],
        name=STRING,
        versions={"type": "array", "items": STRING},
        platform=STRING,
        inputs={"type": "array", "items": _ref("TensorMetadata")},
        outputs={"type": "array", "items": _ref("TensorMetadata")},
    ),
    "RequestInput": _object(
        ["name", "shape", "datatype"],
        name=STRING,
        shape={"type": "array", "items": {"type": "integer", "minimum": 0}},
        datatype={"type": "string", "enum": list(V2_TO_NUMPY)},
        parameters=_object([], binary_data_size={"type": "integer", "minimum": 0}),
        data={"type": "array"},
    ),
    "RequestOutput": _object(
        ["name"],
        name=STRING,
        parameters=_object([], binary_data=BOOLEAN, classification={"type": "integer", "minimum": 0}),
    ),
    "InferenceRequest": _object(
        ["inputs"],
        id=STRING,
        parameters=_object([], binary_data_output=BOOLEAN),
        inputs={"type": "array", "minItems": 1, "items": _ref("RequestInput")},
        outputs={"type": "array", "items": _ref("RequestOutput")},
    ),
    "ResponseOutput": _object(
        ["name", "datatype", "shape"],
        name=STRING,
        datatype=STRING,
        shape=SHAPE,
        parameters=_ref("Parameters"),
        data={"type": "array"},
    ),
    "InferenceResponse": _object(
        ["model_name", "model_version", "outputs"],
        model_name=STRING,
        model_version=STRING,
        id=STRING,
        parameters=_ref("Parameters"),
        outputs={"type": "array", "items": _ref("ResponseOutput")},
    ),
}
_STATS = _object(["model_stats"], model_stats={"type": "array", "items": {"type": "object"}})
_INDEX_ROW = _object(["name", "state", "reason"], name=STRING, version=STRING, state=STRING, reason=STRING)
#: The 200 body of each route FastAPI documents; models are named by path, so every path has both spellings.
OK: dict[str, dict[str, Any]] = {
    "/v2": _ref("ServerMetadata"),
    "/v2/health/live": _object(["live"], live=BOOLEAN),
    "/v2/health/ready": _object(["ready"], ready=BOOLEAN),
    "/v2/warm": _object(["ready", "models_warmed"], ready=BOOLEAN, models_warmed={"type": "array", "items": STRING}),
    "/v2/models/stats": _STATS,
    "/v2/models/{model_name}/stats": _STATS,
    "/v2/models/{model_name}/ready": _object(["name", "ready"], name=STRING, ready=BOOLEAN),
    "/v2/models/{model_name}": _ref("ModelMetadata"),
    "/v2/models/{model_name}/config": _object(["name", "input", "output"]),
    "/v2/repository/index": {"type": "array", "items": _INDEX_ROW},
    "/v2/repository/models/{model_name}/load": {"type": "object"},
    "/v2/repository/models/{model_name}/unload": {"type": "object"},
}
#: The optional JSON bodies of the repository extension's requests.
BODIES: dict[str, dict[str, Any]] = {
    "/v2/repository/index": _object([], ready=BOOLEAN),
    "/v2/repository/models/{model_name}/load": _object([], parameters=_object([])),
    "/v2/repository/models/{model_name}/unload": _object([], parameters=_object([], unload_dependents=BOOLEAN)),
}


def _infer_operation(parameters: list[dict[str, Any]]) -> dict[str, Any]:
    binary = {"schema": BINARY}
    return {
        "summary": "Infer",
        "operationId": "infer_version" if len(parameters) > 1 else "infer",
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref("InferenceRequest")}, "application/octet-stream": binary},
        },
        "responses": {
            "200": {
                "description": "The outputs (binary ones after the JSON, with Inference-Header-Content-Length)",
                "content": {
                    "application/json": {"schema": _ref("InferenceResponse")},
                    "application/octet-stream": binary,
                },
            }
        },
    }


def document(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document (built once)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    path_param = {"in": "path", "required": True, "schema": STRING}
    paths = doc.setdefault("paths", {})
    paths[INFER] = {"post": _infer_operation([{"name": "model_name", **path_param}])}
    paths[INFER_VERSION] = {
        "post": _infer_operation([{"name": "model_name", **path_param}, {"name": "model_version", **path_param}])
    }
    for path, item in paths.items():
        plain = path.replace("/versions/{model_version}", "")
        for method, operation in item.items():
            for parameter in operation.get("parameters", []):
                parameter["schema"] = STRING  # FastAPI writes "string or null" for the optional model_version
            responses = operation["responses"]
            responses.pop("422", None)
            if plain in OK:
                responses["200"] = _json(OK[plain], "Success")
            responses["4XX"] = _json(_ref("Error"), "The request is refused: why, in 'error'")
            if plain in BODIES and method == "post":
                operation["requestBody"] = {"content": {"application/json": {"schema": BODIES[plain]}}}
            if plain.startswith("/v2/repository/models/"):
                responses["501"] = _json(_ref("Error"), "A parameter oclaw does not act on")
            if plain in ("/v2/health/ready", "/v2/warm"):
                responses["503"] = _json({"type": "object"}, "Not every model is ready")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas.update(SCHEMAS)
    app.openapi_schema = doc
    return doc
