"""A small synchronous client of teaserve.v1.CacheController."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterable, List, Mapping, Optional, Union

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


DEFAULT_CONTROLLER = "127.0.0.1:50050"

_WIRE_DTYPES = {"f32": tensor_pb2.F32, "f16": tensor_pb2.F16, "bf16": tensor_pb2.BF16}

# Policies whose ``threshold`` is their own (not TeaCache's rel_l1_thresh).
_THRESHOLD_POLICIES = ("first_block_cache", "mag_cache")
# cache_config fields of the policies after TeaCache, by diffusers' names.
_POLICY_SETTINGS = (
    "max_skip_steps",
    "retention_ratio",
    "mag_ratios",
    "cache_interval",
    "disable_cache_before_step",
    "disable_cache_after_step",
    "max_order",
    "taylor_factors_dtype",
)


class NotAControllerError(grpc.RpcError):
    """The server at the address answered, but does not implement teaserve.v1.CacheController
    (a denoiser, or another gRPC service). ``code()`` is ``UNIMPLEMENTED``; ``details()`` says
    what the server seems to be and where the controller listens by default."""

    def __init__(self, address: str, rpc: str, what: str):
        super().__init__()
        self._details = (
            f"{rpc} failed: UNIMPLEMENTED: the server at {address} does not implement "
            f"teaserve.v1.CacheController ({what}); point the client at the cache-controller, "
            f"which listens on {DEFAULT_CONTROLLER} by default"
        )

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNIMPLEMENTED

    def details(self) -> str:
        return self._details

    def __str__(self) -> str:
        return self._details


def _is_unimplemented_service(e: grpc.RpcError) -> bool:
    """An UNIMPLEMENTED without details: the server has no such service at all."""
    code = getattr(e, "code", None)
    details = getattr(e, "details", None)
    return (
        callable(code)
        and code() == grpc.StatusCode.UNIMPLEMENTED
        and not (details() if callable(details) else "")
    )


def _cache_adapter(cache_adapter: Optional[str], tea_cache_settings: List[str]) -> str:
    """The cache_adapter to send: the one given; ``tea_cache`` when TeaCache settings are given
    without one (a threshold is never ignored); else "" (the controller's default)."""
    adapter = (cache_adapter or "").strip()
    if adapter.lower() == "none" and tea_cache_settings:
        raise ValueError(
            f"cache_adapter='none' turns TeaCache off, but {', '.join(tea_cache_settings)} only "
            "apply to TeaCache; drop them, or use cache_adapter='tea_cache'"
        )
    if adapter:
        return adapter
    return "tea_cache" if tea_cache_settings else ""


class Client:
    """A connection to a cache-controller, e.g. ``Client("127.0.0.1:50050")``.

    ``address`` is ``host:port``, ``http://host:port`` or ``https://host:port``; unset,
    ``$TEASERVE_CONTROLLER`` or 127.0.0.1:50050 (as the ``teaserve`` CLI). ``token`` (default
    ``$TEASERVE_TOKEN``) is sent as ``authorization: Bearer <token>`` to controllers started
    with ``--auth-tokens``; ``root_certificates`` (PEM bytes, default the file named by
    ``$TEASERVE_TLS_CA``) verifies an ``https://`` controller.
    """

    def __init__(
        self,
        address: Optional[str] = None,
        max_message_bytes: int = 512 << 20,
        timeout: Optional[float] = None,
        token: Optional[str] = None,
        root_certificates: Optional[bytes] = None,
    ):
        address = address or os.environ.get("TEASERVE_CONTROLLER") or DEFAULT_CONTROLLER
        self.address = address.strip()
        target = self.address.split("://", 1)[-1].rstrip("/")
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        token = token if token is not None else os.environ.get("TEASERVE_TOKEN")
        self._metadata = [("authorization", f"Bearer {token.strip()}")] if token else None
        ca_file = os.environ.get("TEASERVE_TLS_CA")
        if root_certificates is None and ca_file:
            with open(ca_file, "rb") as f:
                root_certificates = f.read()
        if self.address.startswith("https://") or root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
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

    def _not_a_controller(self, rpc: str) -> NotAControllerError:
        """What to raise when the server has no CacheController service."""
        what = "it looks like a denoiser or another gRPC service"
        try:
            from teaserve.v1 import denoiser_pb2, denoiser_pb2_grpc

            d = denoiser_pb2_grpc.DenoiserStub(self._channel).Describe(
                denoiser_pb2.DescribeRequest(), timeout=5
            )
            what = (
                f"it is a teaserve denoiser serving {d.model_type}; denoisers listen on "
                "127.0.0.1:50051 by default"
            )
        except (grpc.RpcError, ImportError):
            pass
        return NotAControllerError(self.address, rpc, what)

    def list_models(self) -> List[controller_pb2.ModelInfo]:
        """Model types the controller knows, with their defaults (steps, image size, CFG and
        guidance scale, TeaCache threshold and coefficients) and serving endpoints."""
        try:
            resp = self._stub.ListModels(
                controller_pb2.ListModelsRequest(), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as e:
            if _is_unimplemented_service(e):
                raise self._not_a_controller("ListModels") from e
            raise
        return list(resp.models)

    def generate(
        self,
        prompt: str = "",
        *,
        model_class_name: Optional[str] = None,
        model: Optional[str] = None,
        steps: Optional[int] = None,
        cache_adapter: Optional[str] = None,
        rel_l1_thresh: Optional[float] = None,
        threshold: Optional[float] = None,
        model_type: str = "",
        coefficients: Iterable[float] = (),
        warmup_steps: Optional[int] = None,
        cooldown_steps: Optional[int] = None,
        max_consecutive_reuses: Optional[int] = None,
        shared_cfg_decision: Optional[bool] = None,
        cache_settings: Optional[Mapping[str, object]] = None,
        negative_prompt: Optional[str] = None,
        true_cfg_scale: Optional[float] = None,
        cfg_renorm: Optional[bool] = None,
        seed: int = 0,
        height: int = 0,
        width: int = 0,
        guidance_scale: Optional[float] = None,
        max_sequence_length: int = 0,
        inputs: Optional[Mapping[str, np.ndarray]] = None,
        negative_inputs: Optional[Mapping[str, np.ndarray]] = None,
        sigmas: Iterable[float] = (),
        wire_dtype: Union[int, str] = tensor_pb2.F32,
        on_step: Optional[Callable[[StepDecision], None]] = None,
    ) -> GenerateResult:
        """Runs one generation, streaming progress to ``on_step``.

        Text mode (``prompt``) needs a model that ships a text encoder (the embedded
        TinyFluxPipeline does, and FluxPipeline / QwenImagePipeline served from a diffusers
        pipeline folder);
        otherwise pass model-native ``inputs`` as numpy arrays (``hidden_states`` = the
        initial packed latents, ``encoder_hidden_states``, ...). With a prompt, ``inputs`` may
        hold ``hidden_states`` alone: initial noise made elsewhere, used instead of ``seed``.
        ``guidance_scale`` is FLUX.1-dev's embedded guidance (unset: 3.5; refused by models
        without a guidance embedding), ``max_sequence_length`` T5's length (0: 512).

        Unset means the server's default: ``model_class_name`` (alias ``model``) the
        controller's default model, ``steps`` the model's default (``len(sigmas)`` with
        sigmas), ``true_cfg_scale`` the model's, ``cfg_renorm`` the model pipeline's (on for
        QwenImagePipeline). ``negative_prompt`` given, even ``""``, turns true CFG on when the
        CFG scale is above 1, as in diffusers. ``rel_l1_thresh`` (alias ``threshold``) or any
        other TeaCache setting without ``cache_adapter`` turns TeaCache on; with
        ``cache_adapter="none"`` it is a ValueError. With ``cache_adapter="first_block_cache"``
        or ``"mag_cache"`` ``threshold`` is that policy's threshold; their other settings and
        TaylorSeer's (``cache_adapter="taylor_seer"``) go in ``cache_settings`` by diffusers'
        names, e.g. ``{"mag_ratios": [...], "max_skip_steps": 3}`` or
        ``{"cache_interval": 3, "max_order": 2, "taylor_factors_dtype": "float32"}``.

        Errors come back as ``grpc.RpcError`` with the controller's status and message
        (:class:`NotAControllerError` when the address is not a controller).
        """
        model_class_name = _alias("model_class_name", model_class_name, "model", model) or ""
        rel_l1_thresh = _alias("rel_l1_thresh", rel_l1_thresh, "threshold", threshold)
        policy_threshold = (cache_adapter or "").strip() in _THRESHOLD_POLICIES
        unknown = sorted(set(cache_settings or {}) - set(_POLICY_SETTINGS))
        if unknown:
            raise ValueError(
                f"cache_settings {unknown} are not accepted; accepted: {list(_POLICY_SETTINGS)}"
            )
        coefficients = list(coefficients)
        given = [
            name
            for name, value in [
                ("rel_l1_thresh", None if policy_threshold else rel_l1_thresh),
                ("model_type", model_type or None),
                ("coefficients", coefficients or None),
                ("warmup_steps", warmup_steps),
                ("cooldown_steps", cooldown_steps),
                ("max_consecutive_reuses", max_consecutive_reuses),
                ("shared_cfg_decision", shared_cfg_decision),
            ]
            if value is not None
        ]
        adapter = _cache_adapter(cache_adapter, given)
        config = controller_pb2.CacheConfig(model_type=model_type, coefficients=coefficients)
        if rel_l1_thresh is not None and policy_threshold:
            config.threshold = rel_l1_thresh
        elif rel_l1_thresh is not None:
            config.rel_l1_thresh = rel_l1_thresh
        for name, value in (cache_settings or {}).items():
            if name == "mag_ratios":
                config.mag_ratios.extend(float(v) for v in value)
            else:
                setattr(config, name, value)
        if warmup_steps is not None:
            config.warmup_steps = warmup_steps
        if cooldown_steps is not None:
            config.cooldown_steps = cooldown_steps
        if max_consecutive_reuses is not None:
            config.max_consecutive_reuses = max_consecutive_reuses
        if shared_cfg_decision is not None:
            config.shared_cfg_decision = shared_cfg_decision
        if isinstance(wire_dtype, str):
            if wire_dtype.lower() not in _WIRE_DTYPES:
                raise ValueError(f"wire_dtype {wire_dtype!r}: use one of {sorted(_WIRE_DTYPES)}")
            wire_dtype = _WIRE_DTYPES[wire_dtype.lower()]
        req = controller_pb2.GenerateRequest(
            model_class_name=model_class_name,
            cache_adapter=adapter,
            cache_config=config,
            num_inference_steps=0 if steps is None else steps,
            sigmas=list(sigmas),
            prompt=prompt,
            seed=seed,
            height=height,
            width=width,
            wire_dtype=wire_dtype,
            max_sequence_length=max_sequence_length,
        )
        if negative_prompt is not None:
            req.negative_prompt = negative_prompt
        if cfg_renorm is not None:
            req.cfg_renorm = cfg_renorm
        if true_cfg_scale is not None:
            req.true_cfg_scale = true_cfg_scale
        if guidance_scale is not None:
            req.guidance_scale = guidance_scale
        for name, a in (inputs or {}).items():
            req.inputs[name].CopyFrom(from_numpy(a))
        for name, a in (negative_inputs or {}).items():
            req.negative_inputs[name].CopyFrom(from_numpy(a))
        decisions: List[StepDecision] = []
        call = self._stub.Generate(req, timeout=self._timeout, metadata=self._metadata)
        try:
            for event in call:
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
        except grpc.RpcError as e:
            if _is_unimplemented_service(e):
                raise self._not_a_controller("Generate") from e
            raise
        finally:
            # Ctrl-C (KeyboardInterrupt) or an exception in on_step: cancel the call, so the
            # controller frees the session instead of finishing a generation nobody reads.
            call.cancel()
        raise RuntimeError("the controller ended the stream without a result")


def _alias(name: str, value, old_name: str, old_value):
    """``value``, or ``old_value`` given under the older name; both given is a TypeError."""
    if value is not None and old_value is not None:
        raise TypeError(f"give {name}= or its alias {old_name}=, not both")
    return value if value is not None else old_value
