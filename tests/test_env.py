"""Environment checks: compiled-ops detection and detectron2's environment report."""

import sys
import types

from detectron2.utils.collect_env import collect_env_info

from retinanet_plugin.utils import has_compiled_ops


def test_has_compiled_ops_follows_the_placeholder_flag(monkeypatch):
    placeholder = types.ModuleType("detectron2._C")
    placeholder.IS_PLACEHOLDER = True
    monkeypatch.setitem(sys.modules, "detectron2._C", placeholder)
    monkeypatch.setattr("detectron2._C", placeholder, raising=False)
    assert has_compiled_ops() is False

    compiled = types.ModuleType("detectron2._C")  # a real build has no such flag
    monkeypatch.setitem(sys.modules, "detectron2._C", compiled)
    monkeypatch.setattr("detectron2._C", compiled, raising=False)
    assert has_compiled_ops() is True


def test_environment_report_works_with_this_install():
    # default_setup (every train_net.py run) logs this report; with the placeholder _C it must
    # say that nothing is compiled instead of raising.
    report = collect_env_info()
    assert "detectron2" in report
    if not has_compiled_ops():
        assert "placeholder" in report
