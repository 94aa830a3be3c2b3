"""One loaded model version: its session, signature, warm-up and the infer call."""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
from functools import cached_property
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.config import Settings
from engine.datatypes import V2_TO_TRITON_CONFIG
from engine.errors import InvalidInput, ModelLoadError, OclawError
from engine.processing import classify, images_to_batch
from engine.repository.local import ModelFiles, sha256_file
from engine.repository.manifest import ImagePreprocess, Manifest, TextPreprocess
from engine.session import create_session, default_instance_count, device_of
from engine.signature import TensorSpec, check_input, raw_tensor, signature
from engine.stats import ModelStats
from engine.tensors import InferRequest, InferResponse, InputTensor, OutputTensor
from engine.textproc import TextModel
from engine.warmup import Feed, declared_feed, synthetic_feeds

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Iterator
    from concurrent.futures import ThreadPoolExecutor

    import onnxruntime as ort

log = logging.getLogger("oclaw.model")


class InferenceFailed(OclawError):
    """The runtime rejected an input that passed signature checks (e.g. an index out of range)."""

    status = InvalidInput.status


class LoadedModel:
    """A model version with its one session, shared by every thread."""

    def __init__(self, files: ModelFiles, manifest: Manifest, settings: Settings) -> None:
        self.name = files.name
        self.version = files.version
        self.path = files.path
        self.manifest = manifest
        self.settings = settings
        expected = manifest.checksums.get(str(files.version))
        if expected is not None:
            actual = self.sha256
            if actual != expected:
                raise ModelLoadError(f"{files.path}: sha256 {actual} does not match the manifest's {expected}")
        start = perf_counter_ns()
        count = manifest.instance_count
        # each declared instance gets its share of the cores, and no spinning: an idle instance's threads spinning
        # after its run would take the cores another instance is running on (onnxruntime's advice for parallel
        # sessions); the default count follows the device
        threads = max(1, settings.threads // count) if count else None
        shared = dataclasses.replace(settings, allow_spinning=False) if count and count > 1 else settings
        self.session, self.prepared = create_session(files.path, shared, threads)
        count = count or default_instance_count(self.session.get_providers())
        #: The sessions (Triton's model instances); a run takes a free one (``run``).
        self.sessions = [self.session, *(create_session(files.path, shared, threads)[0] for _ in range(count - 1))]
        self._free: queue.SimpleQueue[ort.InferenceSession] | None = None
        if count > 1:
            self._free = queue.SimpleQueue()
            for session in self.sessions:
                self._free.put(session)
        #: Where the sessions run: ``cpu``, ``cuda:<id>``, ...
        self.device = device_of(self.session, settings)
        self.session_ms = (perf_counter_ns() - start) / 1e6
        self.warmup_ms = 0.0
        #: Time spent bringing the model file here (0 for a local repository).
        self.fetch_ms = 0.0
        #: The session's own inputs and outputs; ``inputs``/``outputs`` are what the model serves (for a text
        #: model, one BYTES input of strings; with an embedding post-process, the pooled embedding).
        self.session_inputs = signature(self.session.get_inputs(), manifest.inputs, "input")
        self.session_outputs = signature(self.session.get_outputs(), manifest.outputs, "output")
        self.inputs, self.outputs = self.session_inputs, self.session_outputs
        self._run_names = [s.name for s in self.session_outputs]
        self.text: TextModel | None = None
        if isinstance(manifest.preprocess, TextPreprocess):
            self.text = TextModel(
                self.name,
                manifest.preprocess,
                manifest.embedding,
                {s.name: s.datatype for s in self.session_inputs},
                {s.name: s.shape for s in self.session_outputs},
            )
            self.inputs = (TensorSpec(*self.text.input),)
            if self.text.output is not None and self.text.token_output is not None:
                self.outputs = (TensorSpec(*self.text.output),)
                self._run_names = [self.text.token_output]
        self._inputs = {s.name: s for s in self.inputs}
        self._outputs = {s.name: s for s in self.outputs}
        self._output_names = [s.name for s in self.outputs]
        self.image_input = self._image_input()
        self.classification_output = self._classification_output()
        #: Each input's shape as onnxruntime reports it (symbolic dimension names kept for the warm-up).
        self._dim_names = {node.name: list(node.shape or ()) for node in self.session.get_inputs()}
        self._declared = declared_feed(manifest.warmup, self.session_inputs, self.name) if manifest.warmup else None
        #: The inputs that warmed the model (the warm ping runs them again); None when none ran.
        self.warm_feed: Feed | None = None
        #: Why no warm-up input ran (the model still serves); None when the warm-up ran or has not been tried.
        self.warmup_error: str | None = None
        self.stats = ModelStats()
        self.warm_ns: int | None = None
        self.inline = False
        self._fast_offloaded = 0
        self._closed = threading.Event()
        #: Memory this version holds (the RSS its load added, at least its file's size); measured by the pool.
        self.memory_bytes = 0

    def _image_input(self) -> str | None:
        pre = self.manifest.preprocess
        if not isinstance(pre, ImagePreprocess):
            return None
        name = pre.input or (self.inputs[0].name if len(self.inputs) == 1 else None)
        if name not in self._inputs:
            raise ModelLoadError(f"preprocess.input must name one of the inputs {list(self._inputs)}")
        return name

    def _classification_output(self) -> str | None:
        cls = self.manifest.classification
        if cls is None:
            return None
        name = cls.output or self.outputs[0].name
        if name not in self._outputs:
            raise ModelLoadError(f"postprocess.output must name one of the outputs {list(self._outputs)}")
        return name

    @property
    def concurrency(self) -> int:
        """Runs of this model at a time: OCLAW_MODEL_CONCURRENCY, at least one per instance."""
        return max(self.settings.model_concurrency, len(self.sessions))

    def run(self, names: list[str], feed: Feed) -> list[np.ndarray]:
        """``session.run`` on a free instance (waiting for one when all are running)."""
        if self._free is None:
            results: list[np.ndarray] = self.session.run(names, feed)
            return results
        session = self._free.get()
        try:
            results = session.run(names, feed)
        finally:
            self._free.put(session)
        return results

    @cached_property
    def executor(self) -> ThreadPoolExecutor:
        """The threads that run this model's requests off an event loop (created on first use)."""
        from concurrent.futures import ThreadPoolExecutor

        return ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"oclaw-{self.name}")

    @cached_property
    def sha256(self) -> str:
        """sha256 of the model file (computed once, on first use)."""
        return sha256_file(self.path)

    # -- metadata -------------------------------------------------------------------------------

    def metadata(self, versions: list[int]) -> dict[str, Any]:
        """V2 model metadata."""
        return {
            "name": self.name,
            "versions": [str(v) for v in versions],
            "platform": self.manifest.platform,
            "inputs": [s.as_dict() for s in self.inputs],
            "outputs": [s.as_dict() for s in self.outputs],
        }

    def config(self) -> dict[str, Any]:
        """Triton-style model configuration."""

        def entry(s: TensorSpec) -> dict[str, Any]:
            dims = list(s.shape[1:] if self.manifest.max_batch_size > 0 else s.shape)
            return {"name": s.name, "data_type": V2_TO_TRITON_CONFIG[s.datatype], "dims": dims}

        cfg: dict[str, Any] = {
            "name": self.name,
            "platform": self.manifest.platform,
            "backend": "onnxruntime",
            "max_batch_size": self.manifest.max_batch_size,
            "input": [entry(s) for s in self.inputs],
            "output": [entry(s) for s in self.outputs],
            "parameters": {"sha256": {"string_value": self.sha256}},
            "instance_group": [self.instance_group()],
        }
        if (batching := self.manifest.dynamic_batching) is not None:
            cfg["dynamic_batching"] = {
                "max_queue_delay_microseconds": batching.max_queue_delay_microseconds,
                "preferred_batch_size": list(batching.preferred_batch_size),
                "max_queue_size": batching.max_queue_size,
            }
        if self.manifest.labels:
            cfg["parameters"]["labels"] = {"string_value": str(len(self.manifest.labels))}
        # the version's `oclaw optimize` record says its precision; a version without one is the fp32 source
        record = self.path.parent / "optimization.json"
        try:
            precision = json.loads(record.read_text()).get("precision") if record.is_file() else None
        except (OSError, ValueError, AttributeError):
            precision = None
        cfg["parameters"]["precision"] = {"string_value": precision if isinstance(precision, str) else "fp32"}
        return cfg

    def instance_group(self) -> dict[str, Any]:
        """Triton's ``instance_group`` entry: how many sessions, on which kind of device."""
        if self.device.startswith("cuda:"):
            return {"count": len(self.sessions), "kind": "KIND_GPU", "gpus": [int(self.device.split(":")[1])]}
        return {"count": len(self.sessions), "kind": "KIND_CPU"}

    # -- warm-up ----------------------------------------------------------------------------------

    def warmup_feeds(self) -> Iterator[Feed]:
        """Warm-up inputs to try in turn: the manifest's (and an image for an image model), the rest synthetic."""
        fixed = dict(self._declared or {})
        if self.image_input is not None and self.image_input not in fixed:
            fixed[self.image_input] = self._images(InputTensor(self.image_input, "BYTES", (1,), _tiny_png()))
        if self.text is not None and not fixed:
            fixed = self.text.feed(["oclaw warm-up"])
        return synthetic_feeds(self.session_inputs, self._dim_names, fixed)

    def warm_up(self) -> int | None:
        """Run the model once (and the image path once) so the first request pays no first-run cost.

        Tries the warm-up inputs in turn; when none runs the model still serves: the error is kept in
        ``warmup_error`` and logged as a ``warmup_failed`` warning. Returns the run's nanoseconds (None then).
        """
        began = perf_counter_ns()
        tried, first_error = 0, ""
        for feed in self.warmup_feeds():
            tried += 1
            start = perf_counter_ns()
            try:
                self.session.run(self._run_names, feed)
            except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
                first_error = first_error or str(exc)
                continue
            self.warm_ns = perf_counter_ns() - start
            self.warm_feed = feed
            break
        else:
            self._warm_up_failed(tried, first_error)
            self.warmup_ms = (perf_counter_ns() - began) / 1e6
            return None
        self.warmup_error = None
        for other in self.sessions[1:]:  # every instance pays its own first run here, not on a request
            other.run(self._run_names, feed)
        if self.warm_ns < 10 * self.settings.inline_run_us * 1000:
            # cheap model: time steady-state runs to decide whether it may run on the event loop; the best of
            # three, so one run slowed by a busy machine does not send every later request through a thread hop
            for _ in range(3):
                start = perf_counter_ns()
                self.session.run(self._run_names, feed)
                self.warm_ns = min(self.warm_ns, perf_counter_ns() - start)
        self.inline = self.warm_ns < self.settings.inline_run_us * 1000
        self.warmup_ms = (perf_counter_ns() - began) / 1e6
        return self.warm_ns

    def _warm_up_failed(self, tried: int, error: str) -> None:
        if self._declared is not None and len(self._declared) == len(self.inputs):
            self.warmup_error = f"the warm-up input oclaw.json declares failed to run: {error}"
        else:
            self.warmup_error = (
                f"{tried} synthetic warm-up input(s) failed to run (declare one in oclaw.json 'warmup'): {error}"
            )
        log.warning(
            "model %s/%s serves without a warm-up: %s",
            self.name,
            self.version,
            self.warmup_error,
            extra={"oclaw": {"event": "warmup_failed", "model": self.name, "version": self.version}},
        )

    def load_record(self) -> dict[str, Any]:
        """This version's entry in the cold-start record: session and warm-up times, a failed warm-up's error."""
        record: dict[str, Any] = {
            "session_ms": round(self.session_ms, 1),
            "warmup_ms": round(self.warmup_ms, 1),
            # false when OCLAW_WARMUP skipped it (an on-demand Lambda INIT: the first request is the first run)
            "warmed_up": self.warm_feed is not None,
            "prepared": self.prepared,
            "memory_bytes": self.memory_bytes,
            "device": self.device,
            "instances": len(self.sessions),
        }
        if self.warmup_error is not None:
            record["warmup_error"] = self.warmup_error
        return record

    #: Requests in a row, served on a worker thread under the inline threshold, that make a model run inline.
    INLINE_AFTER = 100

    def note_offloaded(self, elapsed_ns: int) -> None:
        """A request served on a worker thread took ``elapsed_ns``: a model that is steadily faster than the
        inline threshold moves to the event loop (a warm-up timed on a busy machine must not cost every later
        request a thread hop, ~150 µs for a tiny model)."""
        if elapsed_ns < self.settings.inline_run_us * 1000:
            self._fast_offloaded += 1
            if self._fast_offloaded >= self.INLINE_AFTER:
                self.inline = True
        else:
            self._fast_offloaded = 0

    def ping(self) -> float:
        """One inference on the input that warmed the model (keeps a warm instance's model warm); its milliseconds.

        Warms the model first if it never was; 0.0 (nothing run) for a model no warm-up input runs on.
        """
        if self.warm_feed is None and self.warmup_error is None:
            self.warm_up()
        feed = self.warm_feed
        if feed is None:
            return 0.0
        start = perf_counter_ns()
        self.run(self._run_names, feed)
        return (perf_counter_ns() - start) / 1e6

    def estimate_ms(self) -> float:
        """A rough cost of one request, from the warm-up measurement."""
        return (self.warm_ns or 0) / 1e6

    # -- inference --------------------------------------------------------------------------------

    def _images(self, t: InputTensor) -> np.ndarray:
        pre = self.manifest.preprocess
        assert isinstance(pre, ImagePreprocess)
        mbs = self.manifest.max_batch_size
        if mbs > 0 and t.array.size > mbs:
            raise InvalidInput(f"input {t.name!r}: {t.array.size} images exceed max_batch_size {mbs}")
        blobs = [b if isinstance(b, bytes) else str(b).encode() for b in t.array.reshape(-1).tolist()]
        return images_to_batch(blobs, pre, name=t.name, max_pixels=self.settings.max_tensor_elements)

    def _feed(self, request: InferRequest) -> tuple[dict[str, np.ndarray], bool]:
        if self.text is not None:
            return self.text.request_feed(request, self.manifest.max_batch_size), False
        if request.raw is not None:
            if self.image_input is not None and request.raw_kind != "tensor":
                img = InputTensor(self.image_input, "BYTES", (1,), np.array([request.raw], dtype=object))
                return {self.image_input: self._images(img)}, True
            return {self.inputs[0].name: raw_tensor(request.raw, self.inputs, self.name)}, False
        feed: dict[str, np.ndarray] = {}
        image_mode = False
        for t in request.inputs:
            if t.name in feed:
                raise InvalidInput(f"input {t.name!r} appears twice")
            if t.name == self.image_input and t.datatype == "BYTES" and self._inputs[t.name].datatype != "BYTES":
                feed[t.name] = self._images(t)
                image_mode = True
            else:
                feed[t.name] = check_input(t, self._inputs, self.name, self.manifest.max_batch_size)
        missing = [n for n in self._inputs if n not in feed]
        if missing:
            raise InvalidInput(f"missing input(s) {missing} for model {self.name!r}")
        return feed, image_mode

    def _plan(self, request: InferRequest, image_mode: bool) -> list[tuple[str, bool, int]]:
        """(output name, binary, classification k) for each output to return."""
        if request.outputs is None:
            binary = request.binary_output or request.raw_kind == "tensor"
            k = self.manifest.classification.top_k if image_mode and self.manifest.classification else 0
            return [(n, binary, k if n == self.classification_output else 0) for n in self._output_names]
        plan = []
        for out in request.outputs:
            if out.name not in self._outputs:
                raise InvalidInput(f"model {self.name!r} has no output {out.name!r}; outputs: {self._output_names}")
            plan.append((out.name, request.binary_output if out.binary is None else out.binary, out.classification))
        return plan

    def prepare(self, request: InferRequest) -> tuple[dict[str, np.ndarray], list[tuple[str, bool, int]]]:
        """Validate and pre-process a request: the session feed and the output plan."""
        feed, image_mode = self._feed(request)
        return feed, self._plan(request, image_mode)

    def run_plan(self, feed: dict[str, np.ndarray], plan: list[tuple[str, bool, int]]) -> list[np.ndarray]:
        """Run the session for the planned outputs."""
        emb = self.manifest.embedding
        names = self._run_names if emb is not None else [p[0] for p in plan]
        try:
            results = self.run(names, feed)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise InferenceFailed(f"model {self.name!r} could not run this input: {exc}") from None
        if self.text is not None and self.text.output is not None:
            pooled = self.text.pool(results[0], feed)
            return [pooled for _ in plan]
        return results

    def post_process(self, plan: list[tuple[str, bool, int]], results: list[np.ndarray]) -> list[OutputTensor]:
        """Classification where asked; one OutputTensor per planned output."""
        outputs = []
        for (name, binary, k), result in zip(plan, results, strict=True):
            arr = result
            if k:
                soft = name == self.classification_output and bool(
                    self.manifest.classification and self.manifest.classification.softmax
                )
                arr = classify(arr, k, self.manifest.labels, apply_softmax=soft)
            outputs.append(OutputTensor(name, arr, binary))
        return outputs

    @cached_property
    def batchable(self) -> bool:
        """True when every input and output has a variable first (batch) dimension."""
        return all(s.shape and s.shape[0] < 0 for s in (*self.inputs, *self.outputs))

    def infer(
        self, request: InferRequest, enqueue_ns: int | None = None, started_ns: int | None = None
    ) -> InferResponse:
        """Validate, run and post-process one request; thread-safe.

        ``enqueue_ns`` is when the request was queued, ``started_ns`` when its decoding began
        (both ``perf_counter_ns``); decoding counts as compute_input, waiting as queue.
        """
        start = started_ns or perf_counter_ns()
        queue = start - enqueue_ns if enqueue_ns else 0
        try:
            feed, plan = self.prepare(request)
            t1 = perf_counter_ns()
            results = self.run_plan(feed, plan)
            t2 = perf_counter_ns()
            outputs = self.post_process(plan, results)
            response = InferResponse(self.name, str(self.version), outputs, id=request.id)
        except OclawError:
            self.stats.failure(perf_counter_ns() - start + queue)
            raise
        t3 = perf_counter_ns()
        if self.warm_ns is None:  # not warmed up at load: the first run (its first-run cost included) estimates
            self.warm_ns = t2 - t1
        first = next(iter(feed.values()))
        rows = int(first.shape[0]) if first.ndim else 1
        response.rows, response.queue_ns, response.compute_ns = rows, queue, t3 - start
        self.stats.success(
            rows=rows,
            queue=queue,
            compute_input=t1 - start,
            compute_infer=t2 - t1,
            compute_output=t3 - t2,
            total=t3 - start + queue,
        )
        self.stats.run(rows=rows, compute_input=t1 - start, compute_infer=t2 - t1, compute_output=t3 - t2)
        return response

    def close(self) -> None:
        """Stop accepting work; the session is freed when the last in-flight request drops it."""
        self._closed.set()
        if "executor" in self.__dict__:
            self.executor.shutdown(wait=False)


def _tiny_png() -> np.ndarray:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (127, 127, 127)).save(buf, format="PNG")
    arr = np.empty(1, dtype=object)
    arr[0] = buf.getvalue()
    return arr
