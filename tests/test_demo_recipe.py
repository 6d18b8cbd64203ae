"""`make demo`'s two recipes (issue 20 part 5): on a CPU with native bfloat16, 900 steps in
bfloat16 + channels-last (configs/demo_deepforest_mobilenet_v2_fpn_bf16.yaml); elsewhere the
float32 recipe (..._long.yaml). scripts/demo_config.py picks one; emulated bfloat16 is warned
about by key."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retinanet_plugin import precision
from retinanet_plugin.config import load_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import demo_config  # noqa: E402

BF16 = REPO / demo_config.CONFIGS["bf16"]
FP32 = REPO / demo_config.CONFIGS["fp32"]


def _flat(cfg, prefix=""):
    """Every leaf key of a yacs config, dotted."""
    out = {}
    for key, value in cfg.items():
        if hasattr(value, "items"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_bf16_recipe_is_the_float32_recipe_in_bf16_with_a_longer_schedule():
    bf16, fp32 = load_config(str(BF16)), load_config(str(FP32))
    a, b = _flat(bf16), _flat(fp32)
    changed = {k for k in a if a[k] != b[k]}
    assert changed == {"SOLVER.AMP.ENABLED", "SOLVER.AMP.PRECISION", "MODEL.CHANNELS_LAST",
                       "SOLVER.MAX_ITER", "SOLVER.STEPS"}, changed
    assert (bf16.SOLVER.AMP.ENABLED, bf16.SOLVER.AMP.PRECISION, bf16.MODEL.CHANNELS_LAST) == (
        True, "bfloat16", True)
    # The evaluation stays float32: the model exports as the float32 recipe's does.
    assert not bf16.TEST.AMP.ENABLED
    assert bf16.SOLVER.MAX_ITER == 1.5 * fp32.SOLVER.MAX_ITER
    # The LR drops at the same fractions of training.
    assert [s / bf16.SOLVER.MAX_ITER for s in bf16.SOLVER.STEPS] == pytest.approx(
        [s / fp32.SOLVER.MAX_ITER for s in fp32.SOLVER.STEPS])
    assert bf16.OUTPUT_DIR == fp32.OUTPUT_DIR == "output/demo"


@pytest.mark.parametrize("native", [True, False])
def test_demo_config_follows_the_cpu_unless_told(native):
    config, why = demo_config.choose("auto", native)
    assert config == demo_config.CONFIGS["bf16" if native else "fp32"]
    assert config in why and ("has AVX-512 BF16" in why) == native
    for forced in ("bf16", "fp32"):
        config, why = demo_config.choose(forced, native)
        assert config == demo_config.CONFIGS[forced] and f"DEMO_PRECISION={forced}" in why
        assert ("emulated" in why) == (forced == "bf16" and not native)
    with pytest.raises(ValueError, match="DEMO_PRECISION"):
        demo_config.choose("fp16", native)


CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


@pytest.fixture
def uncapped(monkeypatch):
    for name in CAPS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_onednn_cap_below_bf16_means_emulated(uncapped):
    monkeypatch = uncapped
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert precision.cpu_has_native_bf16()
    # oneDNN reads the names without regard to case and ignores values it does not know
    # (" AVX2" and "FOO" leave it uncapped: measured at native speed).
    for name in CAPS:
        for cap, native in (("AVX2", False), ("avx512_core", False), ("AVX512_CORE_VNNI", False),
                            ("AVX512_CORE_BF16", True), ("DEFAULT", True), ("FOO", True),
                            (" AVX2", True)):
            monkeypatch.setenv(name, cap)
            assert precision.cpu_has_native_bf16() is native, (name, cap)
        monkeypatch.delenv(name)
    # ONEDNN_MAX_CPU_ISA wins over the older name, as in oneDNN.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "DEFAULT")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    assert precision.cpu_has_native_bf16()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert not precision.cpu_has_native_bf16()
    monkeypatch.delenv("DNNL_MAX_CPU_ISA")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert not precision.cpu_has_native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert precision.cpu_has_native_bf16()


def test_emulated_bf16_is_warned_once_by_key(uncapped, caplog):
    precision._warn_emulated_bf16.cache_clear()
    uncapped.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    with caplog.at_level(logging.WARNING, logger=precision.__name__):
        for key in ("SOLVER.AMP.PRECISION", "SOLVER.AMP.PRECISION", "TEST.AMP.PRECISION",
                    "SOLVER.AMP.PRECISION", "TEST.AMP.PRECISION"):
            assert precision.autocast_dtype("auto", "cpu", key) == torch.bfloat16
        # CUDA float16 is not bfloat16 on a CPU: nothing to say.
        assert precision.autocast_dtype("auto", "cuda", "TEST.AMP.PRECISION") == torch.float16
    warned = [r.getMessage() for r in caplog.records if "emulates bfloat16" in r.getMessage()]
    assert [w.split()[0] for w in warned] == ["SOLVER.AMP.PRECISION", "TEST.AMP.PRECISION"]
    precision._warn_emulated_bf16.cache_clear()


@pytest.mark.parametrize("cap, expected", [("AVX2", "fp32"), ("", None)])
def test_demo_config_script(uncapped, cap, expected):
    env = {k: v for k, v in os.environ.items() if k not in CAPS}
    if cap:
        env["ONEDNN_MAX_CPU_ISA"] = cap
    if expected is None:  # this machine, as it is, without a cap
        expected = "bf16" if precision.cpu_has_native_bf16() else "fp32"
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "demo_config.py")], cwd=REPO,
                         env=env, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == demo_config.CONFIGS[expected]
    # The last line of stderr (imports may warn before it).
    assert run.stderr.splitlines()[-1].startswith("make demo: ")
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "demo_config.py"), "fp16"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "DEMO_PRECISION" in bad.stderr and not bad.stdout
