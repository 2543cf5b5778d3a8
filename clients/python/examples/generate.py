"""Generate one picture with TeaCache on and off and compare them.

    python examples/generate.py --controller 127.0.0.1:50050 --prompt "a red circle on a blue background"
"""

import argparse
import os
import sys

import numpy as np

import teaserve


def write(path: str, data: bytes) -> str:
    """Writes `data` to `path`; says what was written, and whether it replaced a file."""
    existed = os.path.exists(path)
    with open(path, "wb") as f:
        f.write(data)
    return f"wrote {path}" + (", replacing the earlier file" if existed else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--controller",
        default=os.environ.get("TEASERVE_CONTROLLER", "127.0.0.1:50050"),
        help="host:port or http://host:port (env TEASERVE_CONTROLLER)",
    )
    p.add_argument("--prompt", default="a red circle on a blue background")
    p.add_argument("--model-class-name", default="", help="default: the controller's")
    p.add_argument("--rel-l1-thresh", "--threshold", dest="rel_l1_thresh", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    args = p.parse_args()
    with teaserve.Client(args.controller) as client:
        common = dict(model_class_name=args.model_class_name, steps=args.steps)
        off = client.generate(args.prompt, cache_adapter="none", **common)
        on = client.generate(
            args.prompt,
            rel_l1_thresh=args.rel_l1_thresh,
            on_step=lambda s: print(f"step {s.step:2d} sigma {s.sigma:.3f} {'compute' if s.computed[0] else 'reuse'}"),
            **common,
        )
    print(write("uncached.png", off.image_png))
    print(write("teacache.png", on.image_png))
    mse = float(np.mean((off.latents - on.latents) ** 2))
    print(f"computed {on.computed_steps}/{off.computed_steps} steps; {off.wall_ms:.0f} ms -> {on.wall_ms:.0f} ms; latent MSE {mse:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
