"""Generate one picture with TeaCache on and off and compare them.

    python examples/generate.py --controller 127.0.0.1:50050 --prompt "a red circle on a blue background"
"""

import argparse
import sys

import numpy as np

import teaserve


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--controller", default="127.0.0.1:50050")
    p.add_argument("--prompt", default="a red circle on a blue background")
    p.add_argument("--threshold", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    with teaserve.Client(args.controller) as client:
        off = client.generate(args.prompt, steps=args.steps, cache_adapter="none")
        on = client.generate(
            args.prompt,
            steps=args.steps,
            threshold=args.threshold,
            on_step=lambda s: print(f"step {s.step:2d} sigma {s.sigma:.3f} {'compute' if s.computed[0] else 'reuse'}"),
        )
    open("uncached.png", "wb").write(off.image_png)
    open("teacache.png", "wb").write(on.image_png)
    mse = float(np.mean((off.latents - on.latents) ** 2))
    print(f"computed {on.computed_steps}/{off.computed_steps} steps; {off.wall_ms:.0f} ms -> {on.wall_ms:.0f} ms; latent MSE {mse:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
