"""The Python client against real services: TEASERVE_CONTROLLER names a running controller
whose denoiser serves the embedded TinyFluxPipeline (the Rust harness in
tests/tests/python_client.rs starts both and runs this file)."""

import os
import struct
import zlib

import grpc
import numpy as np
import pytest

import teaserve
from teaserve.v1 import tensor_pb2

ADDRESS = os.environ.get("TEASERVE_CONTROLLER")
needs_services = pytest.mark.skipif(not ADDRESS, reason="TEASERVE_CONTROLLER is not set")
PROMPT = "a red circle on a blue background"


def png_size(png: bytes):
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def test_tensor_round_trip():
    for a in [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.arange(4, dtype=np.float16),
        np.arange(5, dtype=np.int64),
        np.array(3, dtype=np.int32),
    ]:
        b = teaserve.to_numpy(teaserve.from_numpy(a))
        assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)
    bf16 = tensor_pb2.Tensor(dtype=tensor_pb2.BF16, shape=[2], data=struct.pack("<HH", 0x3F80, 0xC000))
    assert teaserve.to_numpy(bf16).tolist() == [1.0, -2.0]
    with pytest.raises(ValueError):
        teaserve.from_numpy(np.array(["x"]))


@needs_services
def test_models_are_listed():
    with teaserve.Client(ADDRESS) as c:
        models = {m.model_type: m for m in c.list_models()}
    assert models["TinyFluxPipeline"].text_mode
    assert models["TinyFluxPipeline"].endpoints


@needs_services
def test_generate_streams_progress_and_returns_a_picture():
    seen = []
    with teaserve.Client(ADDRESS) as c:
        off = c.generate(PROMPT, steps=12, cache_adapter="none", seed=3)
        on = c.generate(PROMPT, steps=12, threshold=0.4, seed=3, on_step=seen.append)
    assert [s.step for s in seen] == list(range(12))
    assert off.computed_steps == 12 and off.reused_steps == 0
    assert on.computed_steps + on.reused_steps == 12
    assert on.reused_steps > 0, "TeaCache at 0.4 reused nothing"
    assert sum(1 for s in seen if s.computed[0]) == on.computed_steps
    assert off.latents.dtype == np.float32 and off.latents.shape == on.latents.shape
    assert np.isfinite(off.latents).all()
    assert png_size(off.image_png) == (32, 32)
    # The same seed gives the same picture; TeaCache stays close to it.
    with teaserve.Client(ADDRESS) as c:
        again = c.generate(PROMPT, steps=12, cache_adapter="none", seed=3)
    assert np.array_equal(again.latents, off.latents)
    assert float(np.abs(on.latents - off.latents).mean()) < 0.5


@needs_services
def test_bad_requests_get_clear_errors():
    with teaserve.Client(ADDRESS) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate(PROMPT, steps=1001)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "num_inference_steps" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            c.generate(PROMPT, threshold=-1.0)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            c.generate("a pink circle")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "pink" in e.value.details()
