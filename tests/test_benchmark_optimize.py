"""The optimize benchmark's own pieces: the numpy-trained digits CNN and its ONNX form, and the table's verdicts."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks import digits_cnn
from benchmarks.optimize import Result, Row, judge, stack, table
from tests.optimodels import digits

SMALL = (16, 32, 64)


def test_the_numpy_cnn_learns_and_its_onnx_predicts_as_the_numpy_forward_pass() -> None:
    data = digits()
    x, y = data.train
    before = digits_cnn.init(channels=SMALL)
    trained = digits_cnn.train(x, y, epochs=4, channels=SMALL)
    xt, yt = data.test
    test_images = digits_cnn.images(xt[:200])
    accuracy = float(np.mean(np.argmax(digits_cnn.forward(trained, test_images), 1) == yt[:200]))
    untrained = float(np.mean(np.argmax(digits_cnn.forward(before, test_images), 1) == yt[:200]))
    assert accuracy > max(0.6, untrained + 0.3), (untrained, accuracy)

    model = digits_cnn.to_onnx(trained)
    assert isinstance(model, onnx.ModelProto)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    few = test_images[:12]
    (got,) = session.run(None, {"x": few})
    want = digits_cnn.forward(trained, few)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert list(np.argmax(got, 1)) == list(np.argmax(want, 1))
    (one,) = session.run(None, {"x": few[:1]})  # the batch axis is dynamic
    np.testing.assert_allclose(one, want[:1], rtol=1e-4, atol=1e-4)


def test_the_table_shows_each_optimized_version_against_its_goal() -> None:
    def row(version: str, mb: float, ms: float, metric: float) -> Row:
        return Row(version, mb, mb / 4.0, ms, 2.0 / ms, 8000 / ms, 2.0 / ms, metric)

    result = Result("digits_cnn", "accuracy (held-out)", "drop <= 0.5 points, >= 1.5x b1")
    result.rows = [
        row("fp32", 4.0, 2.0, 0.99),
        row("fp32 prepared", 4.0, 1.9, 0.99),
        row("int8 fast", 1.0, 1.0, 0.987),  # 0.3 points lower, 2x faster: met
        row("int8 lossy", 1.0, 1.0, 0.98),  # 1 point lower: missed
        row("int8 slow", 1.0, 1.6, 0.99),  # 1.25x: missed
        Row("int8 percentile", 0.0, 0.0, None, None, None, None, None, tool_s=3.0, note="budget not met"),
    ]
    judge(result)
    assert [r.met for r in result.rows] == [None, None, True, False, False, False]
    lines = table([result]).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[-2:] == ["goal", "met?"]
    cells = {line.split("|")[2].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    assert cells["fp32"][-2:] == ["-", "-"]
    assert cells["int8 fast"][-2:] == ["drop <= 0.5 points, >= 1.5x b1", "yes"]
    assert cells["int8 fast"][5] == "2.00"  # b1 speed-up against fp32
    assert cells["int8 lossy"][-1] == "no"
    assert cells["int8 slow"][-1] == "no"
    assert cells["int8 percentile (budget not met)"][2:6] == ["-", "-", "-", "-"]


def test_batch_8_feeds_pad_token_inputs_of_different_lengths() -> None:
    a = {"input_ids": np.array([[2, 5, 3]]), "attention_mask": np.array([[1, 1, 1]])}
    b = {"input_ids": np.array([[2, 3]]), "attention_mask": np.array([[1, 1]])}
    feed = stack([a, b])
    assert feed["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]
    assert feed["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
