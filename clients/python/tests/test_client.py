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
# Named explicitly: the controller these tests run against may predate picking the only served
# model type when model_class_name is empty.
MODEL = "TinyFluxPipeline"


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
    tiny = models[MODEL]
    assert tiny.text_mode
    assert tiny.endpoints
    assert tiny.default_num_inference_steps == 20
    assert (tiny.default_height, tiny.default_width) == (32, 32)
    assert models["FluxPipeline"].default_guidance_scale == 3.5
    assert not tiny.HasField("default_guidance_scale")
    # The same address with a scheme works too.
    with teaserve.Client("http://" + ADDRESS.split("://")[-1]) as c:
        assert {m.model_type for m in c.list_models()} == set(models)
    # A denoiser's address is not a controller's: a clear error, still a grpc.RpcError.
    with teaserve.Client(tiny.endpoints[0]) as c:
        with pytest.raises(teaserve.NotAControllerError) as e:
            c.list_models()
        assert isinstance(e.value, grpc.RpcError)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "does not implement teaserve.v1.CacheController" in e.value.details()
        assert f"teaserve denoiser serving {MODEL}" in e.value.details()
        with pytest.raises(teaserve.NotAControllerError):
            c.generate(PROMPT, model_class_name=MODEL, steps=2)


@needs_services
def test_generate_streams_progress_and_returns_a_picture():
    seen = []
    with teaserve.Client(ADDRESS) as c:
        off = c.generate(PROMPT, model=MODEL, steps=12, cache_adapter="none", seed=3)
        # No cache_adapter: the threshold (under its old name) turns TeaCache on.
        on = c.generate(PROMPT, model=MODEL, steps=12, threshold=0.4, seed=3, on_step=seen.append)
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
        again = c.generate(PROMPT, model_class_name=MODEL, steps=12, cache_adapter="none", seed=3)
        # Steps unset: the model's default (20).
        default = c.generate(PROMPT, model_class_name=MODEL, rel_l1_thresh=0.4, seed=3)
    assert np.array_equal(again.latents, off.latents)
    assert float(np.abs(on.latents - off.latents).mean()) < 0.5
    assert len(default.steps) == 20
    assert default.computed_steps + default.reused_steps == 20
    assert default.reused_steps > 0


@needs_services
def test_other_cache_policies_take_their_settings():
    with teaserve.Client(ADDRESS) as c:
        fbc = c.generate(PROMPT, model=MODEL, steps=12, cache_adapter="first_block_cache", threshold=0.3, seed=3)
        taylor = c.generate(
            PROMPT,
            model=MODEL,
            steps=12,
            cache_adapter="taylor_seer",
            cache_settings={"cache_interval": 3, "disable_cache_before_step": 2, "max_order": 2},
            seed=3,
        )
        with pytest.raises(grpc.RpcError) as e:
            c.generate(PROMPT, model=MODEL, steps=4, cache_adapter="mag_cache", cache_settings={"mag_ratios": [1.0, -1.0]})
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "mag_ratios" in e.value.details()
        with pytest.raises(ValueError, match="cache_settings"):
            c.generate(PROMPT, model=MODEL, cache_adapter="mag_cache", cache_settings={"mag": 1})
    assert fbc.computed_steps + fbc.reused_steps == 12 and fbc.reused_steps > 0
    # Steps 0, 1, 3, 6, 9 compute; the others forecast.
    assert (taylor.computed_steps, taylor.reused_steps) == (5, 7)
    assert np.isfinite(taylor.latents).all()


@needs_services
def test_bad_requests_get_clear_errors():
    with teaserve.Client(ADDRESS) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate(PROMPT, model=MODEL, steps=1001)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "num_inference_steps" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            c.generate(PROMPT, model=MODEL, rel_l1_thresh=-1.0)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "rel_l1_thresh" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            c.generate("a pink circle", model=MODEL)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "pink" in e.value.details()
        # FLUX's settings reach the server: the embedded model has no guidance embedding and
        # a fixed text length.
        with pytest.raises(grpc.RpcError) as e:
            c.generate(PROMPT, model=MODEL, guidance_scale=3.5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no guidance embedding" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            c.generate(PROMPT, model=MODEL, max_sequence_length=64)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_sequence_length" in e.value.details()
        # Refused before any call: contradictory or doubled arguments.
        with pytest.raises(ValueError, match="cache_adapter='none' turns TeaCache off"):
            c.generate(PROMPT, model=MODEL, cache_adapter="none", rel_l1_thresh=0.4)
        with pytest.raises(TypeError, match="rel_l1_thresh= or its alias threshold="):
            c.generate(PROMPT, model=MODEL, rel_l1_thresh=0.4, threshold=0.4)
        with pytest.raises(TypeError, match="model_class_name= or its alias model="):
            c.generate(PROMPT, model=MODEL, model_class_name=MODEL)
        with pytest.raises(ValueError, match="wire_dtype"):
            c.generate(PROMPT, model=MODEL, wire_dtype="f64")
        # Wire dtypes by name.
        r = c.generate(PROMPT, model=MODEL, steps=2, wire_dtype="bf16")
        assert r.latents.dtype == np.float32 and np.isfinite(r.latents).all()


def test_a_controller_with_tokens_needs_the_token():
    address = os.environ["TEASERVE_SECURED_CONTROLLER"]
    with teaserve.Client(address) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.list_models()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "Bearer" in e.value.details()
    with teaserve.Client(address, token="wrong") as c:
        with pytest.raises(grpc.RpcError) as e:
            c.list_models()
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with teaserve.Client(address, token=os.environ["TEASERVE_SECURED_TOKEN"]) as c:
        assert any(m.model_type == MODEL for m in c.list_models())
        r = c.generate(PROMPT, model=MODEL, steps=2)
        assert png_size(r.image_png) == (32, 32)
