"""Which config `make demo` trains, for this CPU: prints the config's path; says why on stderr.

    python scripts/demo_config.py [auto|bf16|fp32]     (make demo DEMO_PRECISION=...)

- bf16: configs/demo_deepforest_mobilenet_v2_fpn_bf16.yaml, 900 steps in bfloat16 with
  channels-last (the demo's training step is about 1.8x faster than float32 on a CPU with
  AVX-512 BF16 or AMX, so 1.5x the steps take less time);
- fp32: configs/demo_deepforest_mobilenet_v2_fpn_long.yaml, the float32 recipe, 600 steps;
- auto (the default): bf16 where the CPU computes bfloat16 natively, fp32 elsewhere (emulated
  bfloat16 made the same step 2.2x (AVX-512) to 11x (AVX2) slower than float32, docs/demo.md).
"""

import argparse
import sys
from typing import Tuple

from retinanet_plugin.precision import cpu_has_native_bf16

CONFIGS = {
    "bf16": "configs/demo_deepforest_mobilenet_v2_fpn_bf16.yaml",
    "fp32": "configs/demo_deepforest_mobilenet_v2_fpn_long.yaml",
}
RECIPES = {
    "bf16": "900 steps in bfloat16 + channels-last",
    "fp32": "600 steps in float32",
}


def choose(precision: str, native_bf16: bool) -> Tuple[str, str]:
    """The config for ``precision`` ("auto", "bf16", "fp32") on a CPU with or without native
    bfloat16, and the sentence that says why."""
    if precision not in ("auto", *CONFIGS):
        raise ValueError(f"DEMO_PRECISION must be auto, bf16 or fp32, got {precision!r}")
    cpu = ("this CPU has AVX-512 BF16 or AMX" if native_bf16
           else "this CPU has neither AVX-512 BF16 nor AMX")
    if precision == "auto":
        precision = "bf16" if native_bf16 else "fp32"
        why = cpu
    else:
        why = f"DEMO_PRECISION={precision} ({cpu})"
        if precision == "bf16" and not native_bf16:
            why += "; bfloat16 is emulated here and slower than float32"
    return CONFIGS[precision], f"make demo: {why}: {RECIPES[precision]}, {CONFIGS[precision]}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("precision", nargs="?", default="auto", help="auto, bf16 or fp32")
    args = parser.parse_args(argv)
    try:
        config, why = choose(args.precision, cpu_has_native_bf16())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(why, file=sys.stderr)
    print(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
