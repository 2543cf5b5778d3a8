"""teaserve's Python client: generate images with TeaCache through the cache-controller.

    import teaserve
    with teaserve.Client("127.0.0.1:50050") as client:
        result = client.generate(prompt="a red circle on a blue background", threshold=0.2)
        open("out.png", "wb").write(result.image_png)

The message and service stubs (`teaserve.v1`) are generated from the repository's protos by
grpcio-tools when the package is built.
"""

from .client import Client, GenerateResult, StepDecision, from_numpy, to_numpy

__all__ = ["Client", "GenerateResult", "StepDecision", "from_numpy", "to_numpy"]
