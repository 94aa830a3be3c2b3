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
    assert props["Environment"]["Variables"]["OCLAW_MODEL_REPOSITORY"] == {"Ref": "ModelRepository"}
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
    assert set(alarms) == {"LatencyAlarm", "ErrorsAlarm", "ThrottlesAlarm", "MemoryAlarm", "DeadLetterAlarm"}
    assert alarms["LatencyAlarm"]["Threshold"] == 50 and alarms["LatencyAlarm"]["Statistic"] == "Average"
    assert alarms["ErrorsAlarm"]["Period"] * alarms["ErrorsAlarm"]["EvaluationPeriods"] == 60
    assert alarms["MemoryAlarm"]["Threshold"] == 90
    assert alarms["DeadLetterAlarm"]["Dimensions"][0]["Value"] == {"Fn::GetAtt": ["DeadLetterQueue", "QueueName"]}
    assert all(a["AlarmActions"] == [{"Ref": "AlarmTopic"}] for a in alarms.values())
    body = cfn["Resources"]["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    widgets = json.loads(re.sub(r"\$\{[^}]+\}", "x", body))["widgets"]
    assert len(widgets) == 4
    env = cfn["Resources"]["InferenceFunction"]["Properties"]["Environment"]["Variables"]
    assert env["OCLAW_METERING_SINKS"] == "log,emf"


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
