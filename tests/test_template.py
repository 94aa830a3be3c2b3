"""template.yaml: cfn-lint, then the real SAM transform offline, with assertions linters cannot make."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse

from tests.conftest import ROOT

TEMPLATE = ROOT / "template.yaml"
RUNTIMES = {"python3.12", "python3.13"}


class StubPolicies:
    """Managed-policy lookup without AWS credentials."""

    def load(self) -> dict[str, str]:
        return {
            "AWSLambdaBasicExecutionRole": "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",
            "AWSXrayWriteOnlyAccess": "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess",
            "AWSLambdaSQSQueueExecutionRole": "arn:aws:iam::aws:policy/service-role/AWSLambdaSQSQueueExecutionRole",
        }


def sam_template() -> dict[str, Any]:
    return dict(yaml_parse(TEMPLATE.read_text()))


def translate(template: dict[str, Any]) -> dict[str, Any]:
    template = copy.deepcopy(template)
    for resource in template["Resources"].values():  # as `sam validate` does: local paths become S3 locations
        if resource["Type"] == "AWS::Serverless::Function":
            resource["Properties"]["CodeUri"] = "s3://placeholder/code.zip"
        elif resource["Type"] == "AWS::Serverless::LayerVersion":
            resource["Properties"]["ContentUri"] = "s3://placeholder/layer.zip"
    return dict(transform(template, {}, StubPolicies()))


def of_type(cfn: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in cfn["Resources"].items() if v["Type"] == kind}


def problems(template: dict[str, Any]) -> list[str]:
    """What cfn-lint does not check: values that deploy fine and then do the wrong thing."""
    found = []
    params = template["Parameters"]
    pattern = params["WarmerRate"]["AllowedPattern"]
    if not re.fullmatch(pattern, params["WarmerRate"]["Default"]):
        found.append("warmer rate")
    cfn = translate(template)
    (function,) = of_type(cfn, "AWS::Lambda::Function").values()
    props = function["Properties"]
    if props["Runtime"] not in RUNTIMES:
        found.append(f"runtime {props['Runtime']}")
    if props["Handler"] != "handler.aws_lambda.lambda_handler":
        found.append("handler")
    for mapping in of_type(cfn, "AWS::Lambda::EventSourceMapping").values():
        if mapping["Properties"].get("FunctionResponseTypes") != ["ReportBatchItemFailures"]:
            found.append("SQS partial batch responses")
    return found


@pytest.fixture(autouse=True)
def region(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SAM transform builds ARNs for a region; no credentials are needed."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_cfn_lint_is_clean() -> None:
    cfn_lint = Path(sys.executable).with_name("cfn-lint")
    out = subprocess.run([str(cfn_lint), str(TEMPLATE)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_sam_transform_produces_what_the_runtime_relies_on() -> None:
    template = sam_template()
    assert problems(template) == []
    cfn = translate(template)
    (function,) = of_type(cfn, "AWS::Lambda::Function").values()
    props = function["Properties"]
    assert props["SnapStart"] == {"ApplyOn": {"Fn::If": ["UseSnapStart", "PublishedVersions", "None"]}}
    assert props["Environment"]["Variables"]["OCLAW_MODEL_REPOSITORY"] == {
        "Fn::If": ["UseS3Models", {"Ref": "ModelRepository"}, "/opt/models"]
    }
    (alias_name,) = of_type(cfn, "AWS::Lambda::Alias")
    assert alias_name == "InferenceFunctionAliaslive" and of_type(cfn, "AWS::Lambda::Version")
    alias = cfn["Resources"][alias_name]["Properties"]
    assert alias["ProvisionedConcurrencyConfig"]["Fn::If"][0] == "UseProvisionedConcurrency"
    (mapping,) = of_type(cfn, "AWS::Lambda::EventSourceMapping").values()
    assert mapping["Properties"]["FunctionName"] == {"Ref": alias_name}  # event sources target the alias
    assert mapping["Properties"]["MaximumBatchingWindowInSeconds"] == 2
    (rule,) = of_type(cfn, "AWS::Events::Rule").values()
    assert rule["Properties"]["ScheduleExpression"] == {"Ref": "WarmerRate"}
    target = rule["Properties"]["Targets"][0]
    assert target["Arn"] == {"Ref": alias_name}
    assert json.loads(target["Input"]["Fn::Sub"].replace("${WarmerConcurrency}", "3")) == {
        "oclaw": "warm",
        "concurrency": 3,
    }
    bucket = cfn["Resources"]["DataBucket"]["Properties"]
    (notification,) = bucket["NotificationConfiguration"]["LambdaConfigurations"]
    assert notification["Filter"]["S3Key"]["Rules"] == [{"Name": "prefix", "Value": {"Ref": "InputPrefix"}}]
    assert bucket["VersioningConfiguration"] == {"Status": "Enabled"}
    assert cfn["Rules"]["SnapStartExcludesProvisionedConcurrency"]["Assertions"][0]["Assert"] == {
        "Fn::Equals": [{"Ref": "ProvisionedConcurrency"}, 0]
    }
    queue = cfn["Resources"]["InferenceQueue"]["Properties"]
    assert queue["RedrivePolicy"]["deadLetterTargetArn"] == {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}


def test_an_s3_event_that_still_fails_after_the_async_retries_is_kept_in_a_queue() -> None:
    """S3 invokes the alias asynchronously: 2 retries, then Lambda sends the event to a queue with an alarm."""
    cfn = translate(sam_template())
    bucket = cfn["Resources"]["DataBucket"]["Properties"]
    (notification,) = bucket["NotificationConfiguration"]["LambdaConfigurations"]
    assert notification["Function"] == {"Ref": "InferenceFunctionAliaslive"}
    (config,) = of_type(cfn, "AWS::Lambda::EventInvokeConfig").values()
    props = config["Properties"]
    assert props["FunctionName"] == {"Ref": "InferenceFunction"} and props["Qualifier"] == "live"  # the alias S3 calls
    assert props["MaximumRetryAttempts"] == 2
    failed = {"Fn::GetAtt": ["FailedEventsQueue", "Arn"]}
    assert props["DestinationConfig"]["OnFailure"]["Destination"] == failed
    assert cfn["Resources"]["FailedEventsQueue"]["Type"] == "AWS::SQS::Queue"
    assert failed != {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}  # not mixed with redrivable inference requests
    statements = role_statements(cfn, {})
    sends = [s for s in statements if s["Resource"] == "<FailedEventsQueue.Arn>"]
    assert [s["Action"] for s in sends] == ["sqs:SendMessage"]  # Lambda sends the failed event as the function's role
    alarm = cfn["Resources"]["FailedEventsAlarm"]["Properties"]
    assert alarm["Dimensions"] == [{"Name": "QueueName", "Value": {"Fn::GetAtt": ["FailedEventsQueue", "QueueName"]}}]
    assert alarm["Threshold"] == 0 and alarm["ComparisonOperator"] == "GreaterThanThreshold"
    # a long object's continuation invokes the alias it was invoked through: the role may invoke it
    invoke = {s["Sid"]: s for s in statements}["InvokeItself"]
    assert invoke["Action"] == "lambda:InvokeFunction"
    assert "arn:aws:lambda:eu-west-1:123456789012:function:oc-inference:*" in invoke["Resource"]


def test_batch_job_is_a_distributed_map_invoking_the_same_function() -> None:
    cfn = translate(sam_template())
    (machine,) = of_type(cfn, "AWS::StepFunctions::StateMachine").values()
    props = machine["Properties"]
    assert props["DefinitionSubstitutions"]["FunctionArn"] == {"Ref": "InferenceFunctionAliaslive"}
    joined = props["DefinitionString"]["Fn::Join"]
    assert all(isinstance(part, str) for part in joined[1])  # no unresolved intrinsics inside the definition
    definition = json.loads(joined[0].join(joined[1]))
    state = definition["States"][definition["StartAt"]]
    assert state["Type"] == "Map" and state["ItemReader"]["Resource"] == "arn:aws:states:::s3:listObjectsV2"
    assert state["ItemProcessor"]["ProcessorConfig"]["Mode"] == "DISTRIBUTED"
    task = state["ItemProcessor"]["States"][state["ItemProcessor"]["StartAt"]]
    assert task["Resource"] == "arn:aws:states:::lambda:invoke"
    assert task["Parameters"]["FunctionName"] == "${FunctionArn}"
    assert task["Parameters"]["Payload"]["oclaw"] == "batch"  # the event handler.s3_events.is_batch_job accepts
    assert "Incomplete" in task["Retry"][0]["ErrorEquals"]  # a stop before the deadline is resumed


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        (("Resources", "InferenceFunction", "Properties", "Runtime"), "python3.99", "runtime python3.99"),
        (
            (
                "Resources",
                "InferenceFunction",
                "Properties",
                "Events",
                "Requests",
                "Properties",
                "FunctionResponseTypes",
            ),
            ["ReportBatchFailures"],
            "SQS partial batch responses",
        ),
        (("Parameters", "WarmerRate", "Default"), "rate(5 minute)", "warmer rate"),
        (("Resources", "InferenceFunction", "Properties", "Handler"), "app.handler", "handler"),
    ],
)
def test_typos_that_linters_miss_are_caught(path: tuple[str, ...], value: Any, problem: str) -> None:
    template = sam_template()
    node: Any = template
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert problem in problems(template)


def test_template_file_exists_at_the_documented_path() -> None:
    assert Path(TEMPLATE).is_file() and "handler.aws_lambda.lambda_handler" in TEMPLATE.read_text()


def test_alarms_dashboard_and_memory_metric() -> None:
    cfn = translate(sam_template())
    alarms = {k: v["Properties"] for k, v in of_type(cfn, "AWS::CloudWatch::Alarm").items()}
    assert set(alarms) == {
        "LatencyAlarm",
        "ErrorsAlarm",
        "ThrottlesAlarm",
        "MemoryAlarm",
        "DeadLetterAlarm",
        "FailedEventsAlarm",
    }
    assert alarms["LatencyAlarm"]["Threshold"] == 50 and alarms["LatencyAlarm"]["Statistic"] == "Average"
    assert alarms["ErrorsAlarm"]["Period"] * alarms["ErrorsAlarm"]["EvaluationPeriods"] == 60
    assert alarms["MemoryAlarm"]["Threshold"] == 90
    assert alarms["DeadLetterAlarm"]["Dimensions"][0]["Value"] == {"Fn::GetAtt": ["DeadLetterQueue", "QueueName"]}
    assert all(a["AlarmActions"] == [{"Ref": "AlarmTopic"}] for a in alarms.values())
    body = cfn["Resources"]["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    widgets = json.loads(re.sub(r"\$\{[^}]+\}", "x", body))["widgets"]
    assert len(widgets) == 4
    env = Evaluator(cfn, {}).value(cfn["Resources"]["InferenceFunction"]["Properties"]["Environment"]["Variables"])
    assert env["OCLAW_METERING_SINKS"] == "log"  # the EMF metrics are on by OCLAW_METRICS


def test_memory_metric_filter_reads_the_report_line() -> None:
    from handler.local_lambda import InvokeResult

    (metric_filter,) = of_type(translate(sam_template()), "AWS::Logs::MetricFilter").values()
    props = metric_filter["Properties"]
    fields = [f.strip() for f in props["FilterPattern"].strip("[]").split(",")]
    report = InvokeResult("req-1", b"{}", None, 12.34, 250.0, 1024, 321).report_line()
    tokens = report.split()
    assert tokens[0] == "REPORT" and fields[0] == 'report="REPORT"'
    value_field = props["MetricTransformations"][0]["MetricValue"].lstrip("$")
    assert tokens[fields.index(value_field)] == "321"  # the Max Memory Used figure


PSEUDO = {
    "AWS::Partition": "aws",
    "AWS::Region": "eu-west-1",
    "AWS::AccountId": "123456789012",
    "AWS::URLSuffix": "amazonaws.com",
    "AWS::StackName": "oc",
}


class Evaluator:
    """Resolves the intrinsics this template uses, for given parameter values (what CloudFormation does at deploy)."""

    def __init__(self, cfn: dict[str, Any], params: dict[str, str]) -> None:
        defaults = {k: str(v.get("Default", "")) for k, v in cfn["Parameters"].items()}
        self.refs = {**PSEUDO, **defaults, **params}
        self.conditions = cfn["Conditions"]

    def condition(self, name: str) -> bool:
        return bool(self.value(self.conditions[name]))

    def value(self, node: Any) -> Any:  # noqa: PLR0911 - one return per intrinsic
        if isinstance(node, list):
            return [v for v in (self.value(n) for n in node) if v is not NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) != 1:
            return {k: v for k, v in ((k, self.value(n)) for k, n in node.items()) if v is not NO_VALUE}
        ((fn, arg),) = node.items()
        if fn == "Ref":
            return NO_VALUE if arg == "AWS::NoValue" else self.refs.get(arg, f"<{arg}>")
        if fn == "Fn::If":
            return self.value(arg[1] if self.condition(arg[0]) else arg[2])
        if fn == "Fn::Equals":
            return self.value(arg[0]) == self.value(arg[1])
        if fn == "Fn::Not":
            return not self.value(arg[0])
        if fn == "Condition":
            return self.condition(arg)
        if fn == "Fn::Select":
            return self.value(arg[1])[int(arg[0])]
        if fn == "Fn::Split":
            return self.value(arg[1]).split(arg[0])
        if fn == "Fn::Sub":
            text, names = (arg, {}) if isinstance(arg, str) else (arg[0], {k: self.value(v) for k, v in arg[1].items()})
            return re.sub(r"\$\{([^}]+)\}", lambda m: str(names.get(m[1], self.refs.get(m[1], f"<{m[1]}>"))), text)
        if fn == "Fn::GetAtt":
            return f"<{'.'.join(arg)}>"
        return {fn: self.value(arg)}


NO_VALUE = object()


def role_statements(cfn: dict[str, Any], params: dict[str, str]) -> list[dict[str, Any]]:
    """The function role's statements; those SAM adds (without a Sid) are named after their policy."""
    evaluator = Evaluator(cfn, params)
    role = cfn["Resources"]["InferenceFunctionRole"]["Properties"]
    return [
        {"Sid": policy["PolicyName"], **s}
        for policy in role["Policies"]
        for s in evaluator.value(policy["PolicyDocument"]["Statement"])
    ]


@pytest.mark.parametrize(
    ("repository", "model_resources"),
    [
        ("", None),
        ("s3://my-models/prod/v1", ("arn:aws:s3:::my-models/prod/v1*", "arn:aws:s3:::my-models")),
        ("s3://my-models", ("arn:aws:s3:::my-models*", "arn:aws:s3:::my-models")),
    ],
)
def test_model_repository_is_a_layer_or_an_s3_prefix_with_least_privilege(
    repository: str, model_resources: tuple[str, str] | None
) -> None:
    cfn = translate(sam_template())
    evaluator = Evaluator(cfn, {"ModelRepository": repository})
    function = cfn["Resources"]["InferenceFunction"]["Properties"]
    env = evaluator.value(function["Environment"]["Variables"])
    layers = evaluator.value(function["Layers"])
    if model_resources is None:
        assert env["OCLAW_MODEL_REPOSITORY"] == "/opt/models" and len(layers) == 2
    else:
        assert env["OCLAW_MODEL_REPOSITORY"] == repository and len(layers) == 1  # no models layer
    assert evaluator.condition("UseModelsLayer") == (model_resources is None)
    assert sam_template()["Resources"]["ModelsLayer"]["Condition"] == "UseModelsLayer"
    statements = role_statements(cfn, {"ModelRepository": repository})
    by_sid = {s["Sid"]: s for s in statements}
    if model_resources is None:
        assert "ReadModels" not in by_sid and "ListModels" not in by_sid
    else:
        assert by_sid["ReadModels"]["Resource"] == model_resources[0]
        assert by_sid["ReadModels"]["Action"] == "s3:GetObject"
        assert by_sid["ListModels"]["Resource"] == model_resources[1]
    for statement in statements:  # nothing is granted on everything
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        assert all(r != "*" and not r.endswith(":::*") for r in resources), statement
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        assert all("*" not in a for a in actions), statement
    data = "arn:aws:s3:::oc-data-123456789012"
    assert set(by_sid["WriteResults"]["Resource"]) == {f"{data}/output/*", f"{data}/sqs-results/*"}
    assert set(by_sid["ReadInputsAndOutputs"]["Resource"]) == {f"{data}/input/*", f"{data}/output/*"}
    warm = "arn:aws:lambda:eu-west-1:123456789012:function:oc-inference"
    assert by_sid["InvokeItself"]["Resource"] == [warm, f"{warm}:*"]  # itself, and nothing else
    assert evaluator.value(function["FunctionName"]) == "oc-inference"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("", True),
        ("s3://my-models/prod", True),
        ("s3://a.b-c/x/y/", True),
        ("models", False),
        ("/opt/models", False),
        ("s3://", False),
        ("s3://UPPER/x", False),
        ("https://my-models/prod", False),
    ],
)
def test_model_repository_parameter_accepts_only_s3_uris(value: str, ok: bool) -> None:
    pattern = sam_template()["Parameters"]["ModelRepository"]["AllowedPattern"]
    assert (re.fullmatch(pattern, value) is not None) == ok


def test_runtime_layer_per_architecture_and_the_function_package() -> None:
    template = sam_template()
    resources = template["Resources"]
    for arch, name in (("x86_64", "RuntimeLayerX8664"), ("arm64", "RuntimeLayerArm64")):
        layer = resources[name]
        assert layer["Metadata"]["BuildArchitecture"] == arch  # or sam build makes an x86_64 layer for arm64
        assert layer["Properties"]["CompatibleArchitectures"] == [arch]
        assert layer["Properties"]["CompatibleRuntimes"] == [resources["InferenceFunction"]["Properties"]["Runtime"]]
    cfn = translate(template)
    for arch, expected in (("x86_64", "RuntimeLayerX8664"), ("arm64", "RuntimeLayerArm64")):
        evaluator = Evaluator(cfn, {"Architecture": arch})
        layers = evaluator.value(cfn["Resources"]["InferenceFunction"]["Properties"]["Layers"])
        (name,) = [k for k in cfn["Resources"] if k.startswith(expected)]  # the transform adds a content hash
        assert layers[0] == f"<{name}>"
        assert evaluator.condition(cfn["Resources"][name]["Condition"])  # only the chosen one is created
    assert sorted(p.name for p in (ROOT / "function").iterdir()) == ["engine", "handler"]


@pytest.mark.parametrize("auth", ["AWS_IAM", "NONE"])
def test_http_entry_points_are_iam_by_default_and_can_be_opened(auth: str) -> None:
    template = sam_template()
    assert template["Parameters"]["FunctionUrlAuth"]["Default"] == "AWS_IAM"
    cfn = translate(template)
    evaluator = Evaluator(cfn, {"FunctionUrlAuth": auth})
    (url,) = of_type(cfn, "AWS::Lambda::Url").values()
    assert evaluator.value(url["Properties"]["AuthType"]) == auth
    assert url["Properties"]["TargetFunctionArn"] == {"Ref": "InferenceFunctionAliaslive"}  # the alias, not $LATEST
    public = [k for k, v in cfn["Resources"].items() if v.get("Condition") == "PublicFunctionUrl"]
    assert sorted(public) == ["PublicUrlInvokePermission", "PublicUrlPermission"]
    assert evaluator.condition("PublicFunctionUrl") == (auth == "NONE")
    body = cfn["Resources"]["HttpApi"]["Properties"]["Body"]
    route = body["paths"]["/{proxy+}"]["x-amazon-apigateway-any-method"]
    assert route["security"] == [{"AWS_IAM": []}]  # SigV4 on every route
    assert body["components"]["securitySchemes"]["AWS_IAM"]["x-amazon-apigateway-authtype"] == "awsSigv4"
    integration = route["x-amazon-apigateway-integration"]
    assert (
        integration["payloadFormatVersion"] == "2.0" and "InferenceFunctionAliaslive" in integration["uri"]["Fn::Sub"]
    )
    assert set(cfn["Outputs"]) >= {"FunctionUrl", "HttpApiUrl", "DataBucketName", "InferenceQueueUrl", "BatchJobArn"}
    assert (
        evaluator.value(cfn["Outputs"]["HttpApiUrl"]["Value"])
        == "https://<HttpApi>.execute-api.eu-west-1.amazonaws.com/"
    )


def test_model_bucket_is_private_encrypted_versioned_and_tls_only() -> None:
    cfn = translate(sam_template())
    bucket = cfn["Resources"]["DataBucket"]["Properties"]
    assert bucket["VersioningConfiguration"] == {"Status": "Enabled"}
    (rule,) = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in {"AES256", "aws:kms"}
    assert all(bucket["PublicAccessBlockConfiguration"].values()) and len(bucket["PublicAccessBlockConfiguration"]) == 4
    (statement,) = cfn["Resources"]["DataBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert statement["Effect"] == "Deny" and statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


@pytest.mark.parametrize(
    ("arn", "sid", "actions"),
    [
        ("", None, None),
        ("arn:aws:sqs:eu-west-1:123456789012:metering", "MeteringQueue", "sqs:SendMessage"),
        (
            "arn:aws:kinesis:eu-west-1:123456789012:stream/metering",
            "MeteringStream",
            ["kinesis:PutRecords", "kinesis:PutRecord"],
        ),
        (
            "arn:aws:firehose:eu-west-1:123456789012:deliverystream/m",
            "MeteringDeliveryStream",
            ["firehose:PutRecordBatch", "firehose:PutRecord"],
        ),
    ],
)
def test_the_metering_sink_may_write_to_its_target_only(arn: str, sid: str | None, actions: Any) -> None:
    template = sam_template()
    assert re.fullmatch(template["Parameters"]["MeteringTargetArn"]["AllowedPattern"], arn)
    cfn = translate(template)
    by_sid = {st["Sid"]: st for st in role_statements(cfn, {"MeteringTargetArn": arn})}
    metering = {k for k in by_sid if k.startswith("Metering")}
    if sid is None:
        assert metering == set()
    else:
        assert metering == {sid} and by_sid[sid]["Resource"] == arn and by_sid[sid]["Action"] == actions
    for bad in ("arn:aws:s3:::bucket", "sqs:metering", "arn:aws:sqs:eu-west-1:1234:q"):
        assert not re.fullmatch(template["Parameters"]["MeteringTargetArn"]["AllowedPattern"], bad)
