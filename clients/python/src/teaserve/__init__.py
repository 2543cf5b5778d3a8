"""teaserve's Python client: generate images with TeaCache through the cache-controller.

    import teaserve
    with teaserve.Client("127.0.0.1:50050") as client:
        result = client.generate("a red circle on a blue background", rel_l1_thresh=0.2)
        open("out.png", "wb").write(result.image_png)

The message and service stubs (`teaserve.v1`) are generated from the repository's protos by
grpcio-tools when the package is built (an editable install writes them to src/teaserve/v1).
"""

from .client import (
    Client,
    GenerateResult,
    NotAControllerError,
    StepDecision,
    from_numpy,
    to_numpy,
)

__all__ = [
    "Client",
    "GenerateResult",
    "NotAControllerError",
    "StepDecision",
    "from_numpy",
    "to_numpy",
]
