"""A small synchronous client of teaserve.v1.CacheController."""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, List, Mapping, Optional

import grpc
import numpy as np

from teaserve.v1 import controller_pb2, controller_pb2_grpc, tensor_pb2

_NUMPY = {
    tensor_pb2.F32: np.dtype("<f4"),
    tensor_pb2.F16: np.dtype("<f2"),
    tensor_pb2.I32: np.dtype("<i4"),
    tensor_pb2.I64: np.dtype("<i8"),
}


def to_numpy(t: tensor_pb2.Tensor) -> np.ndarray:
    """A wire tensor as a numpy array (BF16 is widened to float32)."""
    shape = tuple(t.shape)
    if t.dtype == tensor_pb2.BF16:
        raw = np.frombuffer(t.data, dtype="<u2").astype(np.uint32) << 16
        return raw.view(np.float32).reshape(shape)
    if t.dtype not in _NUMPY:
        raise ValueError(f"unsupported tensor dtype {t.dtype}")
    return np.frombuffer(t.data, dtype=_NUMPY[t.dtype]).reshape(shape).copy()


def from_numpy(a: np.ndarray) -> tensor_pb2.Tensor:
    """A numpy array as a wire tensor (float32, float16, int32 or int64)."""
    a = np.asarray(a, order="C")
    for dtype, np_dtype in _NUMPY.items():
        if a.dtype == np_dtype.newbyteorder("=") or a.dtype == np_dtype:
            return tensor_pb2.Tensor(
                dtype=dtype, shape=list(a.shape), data=a.astype(np_dtype, copy=False).tobytes()
            )
    if a.dtype == np.float64:
        return from_numpy(a.astype(np.float32))
    raise ValueError(f"unsupported numpy dtype {a.dtype}; use float32, float16, int32 or int64")


@dataclasses.dataclass
class StepDecision:
    """One denoising step as the controller reports it: per CFG branch, computed or reused."""

    step: int
    sigma: float
    computed: List[bool]
    accumulated: List[float]
    elapsed_ms: float


@dataclasses.dataclass
class GenerateResult:
    """A finished generation."""

    latents: np.ndarray
    image_png: bytes
    computed_steps: int
    reused_steps: int
    wall_ms: float
    session_id: str
    trace_id: str
    steps: List[StepDecision]


class Client:
    """A connection to a cache-controller, e.g. ``Client("127.0.0.1:50050")``."""

    def __init__(self, address: str, max_message_bytes: int = 512 << 20, timeout: Optional[float] = None):
        target = address.split("://", 1)[-1]
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._channel = grpc.insecure_channel(target, options=options)
        self._stub = controller_pb2_grpc.CacheControllerStub(self._channel)
        self._timeout = timeout

    def close(self) -> None:
        """Closes the connection."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def list_models(self) -> List[controller_pb2.ModelInfo]:
        """Model types the controller knows, with their coefficients and serving endpoints."""
        return list(self._stub.ListModels(controller_pb2.ListModelsRequest(), timeout=self._timeout).models)

    def generate(
        self,
        prompt: str = "",
        *,
        model: str = "TinyFluxPipeline",
        steps: int = 20,
        cache_adapter: str = "tea_cache",
        threshold: Optional[float] = None,
        coefficients: Iterable[float] = (),
        negative_prompt: str = "",
        true_cfg_scale: Optional[float] = None,
        seed: int = 0,
        height: int = 0,
        width: int = 0,
        inputs: Optional[Mapping[str, np.ndarray]] = None,
        negative_inputs: Optional[Mapping[str, np.ndarray]] = None,
        sigmas: Iterable[float] = (),
        wire_dtype: int = tensor_pb2.F32,
        on_step: Optional[Callable[[StepDecision], None]] = None,
    ) -> GenerateResult:
        """Runs one generation, streaming progress to ``on_step``.

        Text mode (``prompt``) needs a model that ships a text encoder (the embedded
        TinyFluxPipeline does); otherwise pass model-native ``inputs`` as numpy arrays
        (``hidden_states`` = the initial packed latents, ``encoder_hidden_states``, ...).
        Errors come back as ``grpc.RpcError`` with the controller's status and message.
        """
        config = controller_pb2.CacheConfig(coefficients=list(coefficients))
        if threshold is not None:
            config.rel_l1_thresh = threshold
        req = controller_pb2.GenerateRequest(
            model_class_name=model,
            cache_adapter=cache_adapter,
            cache_config=config,
            num_inference_steps=steps,
            sigmas=list(sigmas),
            prompt=prompt,
            negative_prompt=negative_prompt,
            seed=seed,
            height=height,
            width=width,
            wire_dtype=wire_dtype,
        )
        if true_cfg_scale is not None:
            req.true_cfg_scale = true_cfg_scale
        for name, a in (inputs or {}).items():
            req.inputs[name].CopyFrom(from_numpy(a))
        for name, a in (negative_inputs or {}).items():
            req.negative_inputs[name].CopyFrom(from_numpy(a))
        decisions: List[StepDecision] = []
        for event in self._stub.Generate(req, timeout=self._timeout):
            kind = event.WhichOneof("event")
            if kind == "step":
                s = event.step
                d = StepDecision(
                    step=s.step,
                    sigma=s.sigma,
                    computed=[b.computed for b in s.branches],
                    accumulated=[b.accumulated for b in s.branches],
                    elapsed_ms=s.elapsed_ms,
                )
                decisions.append(d)
                if on_step is not None:
                    on_step(d)
            elif kind == "result":
                r = event.result
                return GenerateResult(
                    latents=to_numpy(r.latents),
                    image_png=bytes(r.image_png),
                    computed_steps=r.computed_steps,
                    reused_steps=r.reused_steps,
                    wall_ms=r.wall_ms,
                    session_id=r.session_id,
                    trace_id=r.trace_id,
                    steps=decisions,
                )
        raise RuntimeError("the controller ended the stream without a result")


