"""What Cloud Run accepts in the files ``validate.py`` checks: the strict JSON Schemas of a Knative Service (its
fields and the annotations of each metadata level) and of the Cloud Scheduler warm-ping job's flags file."""

from __future__ import annotations

import re
from typing import Any

# -- the Knative / Cloud Run envelope ---------------------------------------------------------------

_BOOL = {"type": "string", "enum": ["true", "false"]}
_COUNT = {"type": "string", "pattern": r"^(0|[1-9][0-9]{0,3})$"}
_TEXT = {"type": "string"}
#: Output-only annotations that `gcloud run services describe --format export` writes on either level.
_OUTPUT_ONLY = {
    f"run.googleapis.com/{key}": _TEXT
    for key in ("client-name", "client-version", "operation-id", "creator", "lastModifier", "urls", "ingress-status")
}
#: Annotations of the Service itself (metadata.annotations).
SERVICE_ANNOTATIONS: dict[str, Any] = {
    "run.googleapis.com/launch-stage": {"type": "string", "enum": ["ALPHA", "BETA", "GA"]},
    "run.googleapis.com/ingress": {"type": "string", "enum": ["all", "internal", "internal-and-cloud-load-balancing"]},
    "run.googleapis.com/description": _TEXT,
    "run.googleapis.com/binary-authorization": _TEXT,
    "run.googleapis.com/binary-authorization-breakglass": _TEXT,
    "run.googleapis.com/invoker-iam-disabled": _BOOL,
    "run.googleapis.com/default-url-disabled": _BOOL,
    **_OUTPUT_ONLY,
}
#: Annotations of each revision (spec.template.metadata.annotations).
REVISION_ANNOTATIONS: dict[str, Any] = {
    "autoscaling.knative.dev/minScale": _COUNT,
    "autoscaling.knative.dev/maxScale": _COUNT,
    "run.googleapis.com/startup-cpu-boost": _BOOL,
    "run.googleapis.com/cpu-throttling": _BOOL,
    "run.googleapis.com/execution-environment": {"type": "string", "enum": ["gen1", "gen2"]},
    "run.googleapis.com/sessionAffinity": _BOOL,
    "run.googleapis.com/vpc-access-connector": _TEXT,
    "run.googleapis.com/vpc-access-egress": {"type": "string", "enum": ["all-traffic", "private-ranges-only"]},
    "run.googleapis.com/network-interfaces": _TEXT,
    "run.googleapis.com/cloudsql-instances": _TEXT,
    "run.googleapis.com/secrets": _TEXT,
    "run.googleapis.com/container-dependencies": _TEXT,
    "run.googleapis.com/encryption-key": _TEXT,
    "run.googleapis.com/encryption-key-shutdown-hours": _COUNT,
    "run.googleapis.com/post-key-revocation-action-type": _TEXT,
    "run.googleapis.com/gpu-zonal-redundancy-disabled": _BOOL,
    **_OUTPUT_ONLY,
}
#: Annotation domains whose keys must be known (anything else, e.g. your own, only has to be a string).
CONTROLLED = re.compile(r"^(autoscaling\.knative\.dev|run\.googleapis\.com|serving\.knative\.dev)/")
_LABELS = {
    "type": "object",
    "propertyNames": {"pattern": r"^([a-z][a-z0-9_-]{0,62}|cloud\.googleapis\.com/location)$"},
    "additionalProperties": {"type": "string", "pattern": r"^[a-z0-9_-]{0,63}$"},
}


def _annotations(known: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": known, "additionalProperties": _TEXT}


#: Fields of ``spec.template.spec`` Cloud Run takes: a subset of the PodSpec plus Knative's revision fields.
POD_FIELDS = ("containers", "volumes", "serviceAccountName", "nodeSelector")
REVISION_FIELDS: dict[str, Any] = {
    "containerConcurrency": {"type": "integer", "minimum": 1, "maximum": 1000},
    "timeoutSeconds": {"type": "integer", "minimum": 1, "maximum": 3600},
}
CONTAINER_FIELDS = (
    "name",
    "image",
    "command",
    "args",
    "env",
    "ports",
    "resources",
    "volumeMounts",
    "workingDir",
    "startupProbe",
    "readinessProbe",
    "livenessProbe",
)
#: Environment variables Cloud Run sets itself and refuses in a service's spec.
RESERVED_ENV = ("PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION")

SERVICE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.knative.dev/v1"},
        "kind": {"const": "Service"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z]([-a-z0-9]{0,47}[a-z0-9])?$"},
                "namespace": _TEXT,
                "labels": _LABELS,
                "annotations": _annotations(SERVICE_ANNOTATIONS),
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["template"],
            "properties": {
                "template": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["spec"],
                    "properties": {
                        "metadata": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string", "pattern": r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"},
                                "labels": _LABELS,
                                "annotations": _annotations(REVISION_ANNOTATIONS),
                            },
                        },
                        "spec": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["containers"],
                            "properties": {
                                **REVISION_FIELDS,
                                "containers": {
                                    "type": "array",
                                    "minItems": 1,
                                    "maxItems": 10,
                                    "items": {
                                        "type": "object",
                                        "required": ["image"],
                                        "propertyNames": {"enum": list(CONTAINER_FIELDS)},
                                    },
                                },
                                "volumes": {"type": "array"},
                                "serviceAccountName": {"type": "string", "pattern": r"^[^@\s]+@[^@\s]+$"},
                                "nodeSelector": {"type": "object", "additionalProperties": _TEXT},
                            },
                        },
                    },
                },
                "traffic": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "percent": {"type": "integer", "minimum": 0, "maximum": 100},
                            "latestRevision": {"type": "boolean"},
                            "revisionName": _TEXT,
                            "tag": _TEXT,
                        },
                    },
                },
            },
        },
    },
}

# -- the Cloud Scheduler job (a --flags-file of `gcloud scheduler jobs create http`) ----------------

_DURATION = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?s$"}
SCHEDULER_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": [
        "--location",
        "--schedule",
        "--uri",
        "--http-method",
        "--oidc-service-account-email",
        "--oidc-token-audience",
    ],
    "properties": {
        "--location": {"type": "string", "pattern": r"^[A-Za-z0-9_-]+$"},
        "--schedule": {"type": "string", "pattern": r"^\S+( \S+){4}$"},
        "--time-zone": {"type": "string", "pattern": r"^[A-Za-z_]+(/[A-Za-z0-9_+-]+)*$"},
        "--uri": {"type": "string", "pattern": r"^https://[^/\s]+/\S*$"},
        "--http-method": {"type": "string", "pattern": r"^(?i:get|post|put|patch|delete|head|options)$"},
        "--headers": _TEXT,
        "--message-body": _TEXT,
        "--oidc-service-account-email": {
            "type": "string",
            "pattern": r"^[a-z][a-z0-9-]{4,28}[a-z0-9]@[A-Za-z0-9_.-]+\.iam\.gserviceaccount\.com$",
        },
        "--oidc-token-audience": {"type": "string", "pattern": r"^https://[^/\s]+/?$"},
        "--attempt-deadline": _DURATION,
        "--max-retry-attempts": {"type": "integer", "minimum": 0, "maximum": 5},
        "--max-retry-duration": _DURATION,
        "--min-backoff": _DURATION,
        "--max-backoff": _DURATION,
        "--max-doublings": {"type": "integer", "minimum": 0},
        "--description": {"type": "string", "maxLength": 500},
    },
}
CRON_FIELD = re.compile(r"^(\*|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?(,(\*|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?)*$")
