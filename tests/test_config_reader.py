"""One reader for config files (issue 15, items 6 and 7; issue 19, "The first five minutes").

``retinanet_plugin.config.read_config_file`` reads a YAML config and its ``_BASE_`` files safely,
computes detectron2's model-zoo arithmetic eval tag within fixed bounds, and says which file set
a key; ``load_config_file`` merges what it read, and dataset registration asks it where
``DATASETS.COCO_INSTANCES`` was set.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from detectron2 import model_zoo
from detectron2.config import get_cfg

from retinanet_plugin import add_retinanet_plugin_config, config_file
from retinanet_plugin.config import load_config, load_config_file
from retinanet_plugin.config_file import read_config_file

REPO = Path(__file__).resolve().parents[1]
# detectron2's Base-RetinaNet.yaml writes its anchor sizes so.
ANCHORS_EVAL = (
    'SIZES: !!python/object/apply:eval ["[[x, x * 2**(1.0/3), x * 2**(2.0/3)] '
    'for x in [32, 64, 128, 256, 512]]"]'
)


def _cfg():
    return add_retinanet_plugin_config(get_cfg())


def _yaml(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# ---- Item 6: DATASETS.COCO_INSTANCES beside the model zoo's eval tag --------------------------


def _datasets_with_eval_tag(path):
    return _yaml(
        path,
        f"""\
        _BASE_: "{model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml")}"
        MODEL:
          ANCHOR_GENERATOR:
            {ANCHORS_EVAL}
        DATASETS:
          COCO_INSTANCES: [["mine_train", "data/train.json", "data/images"]]
        """,
    )


def test_coco_instances_in_a_file_with_the_eval_tag(tmp_path, monkeypatch):
    config = _datasets_with_eval_tag(tmp_path / "project" / "mine.yaml")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    cfg = load_config(str(config))
    data = tmp_path / "project" / "data"
    assert cfg.DATASETS.COCO_INSTANCES == [["mine_train", str(data / "train.json"),
                                            str(data / "images")]]  # fmt: skip
    theirs = _cfg()
    theirs.merge_from_file(str(config))
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES == theirs.MODEL.ANCHOR_GENERATOR.SIZES


def test_coco_instances_inherited_past_a_file_with_the_eval_tag(tmp_path, monkeypatch):
    # child.yaml (no datasets) -> anchors.yaml (the eval tag, no datasets) -> mine.yaml (datasets)
    _datasets_with_eval_tag(tmp_path / "project" / "mine.yaml")
    _yaml(
        tmp_path / "project" / "sub" / "anchors.yaml",
        f"""\
        _BASE_: ../mine.yaml
        MODEL:
          ANCHOR_GENERATOR:
            {ANCHORS_EVAL}
        """,
    )
    child = _yaml(
        tmp_path / "elsewhere" / "child.yaml",
        """\
        _BASE_: ../project/sub/anchors.yaml
        SOLVER:
          MAX_ITER: 7
        """,
    )
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(str(child))
    # Relative to mine.yaml, the file that sets the key.
    assert cfg.DATASETS.COCO_INSTANCES[0][1] == str(tmp_path / "project" / "data" / "train.json")
    assert cfg.SOLVER.MAX_ITER == 7


# ---- Item 7: the eval tag's cost is bounded ---------------------------------------------------

# Loads the config given as argv[1] in a fresh process; once the imports are done it has 10 s of
# CPU time (SIGALRM's default action ends the process: a long integer power or a huge list is C
# code that no Python-level timeout interrupts) and 2 GiB more address space.
_LOAD_IN_TEN_SECONDS = """\
import resource, signal, sys
from detectron2.config import get_cfg
from retinanet_plugin import add_retinanet_plugin_config
from retinanet_plugin.config import load_config_file
cfg = add_retinanet_plugin_config(get_cfg())
status = open("/proc/self/status").read().split()
vm_bytes = int(status[status.index("VmSize:") + 1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm_bytes + 2 ** 31, resource.RLIM_INFINITY))
signal.alarm(10)
try:
    load_config_file(cfg, sys.argv[1])
except ValueError as e:
    print("REFUSED:", e)
else:
    print("LOADED:", cfg.MODEL.ANCHOR_GENERATOR.SIZES)
"""


def _refused_in_ten_seconds(path):
    """What refused the config ``path``, loaded in a fresh process that may not take longer."""
    run = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_TEN_SECONDS, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, f"killed or failed ({run.returncode}): {run.stderr[-2000:]}"
    assert run.stdout.startswith("REFUSED:"), run.stdout[:2000]
    return run.stdout


def _shared(depth, leaf="0"):
    """A comprehension reusing its loop variable, nested: 2 ** depth numbers from a few steps."""
    expression = f"[{leaf}]"
    for _ in range(depth):
        expression = f"[[v, v] for v in [{expression}]]"
    return expression


@pytest.mark.parametrize(
    "expression",
    [
        "((((((2**64)**64)**64)**64)**64)**64)",  # 2 ** (64 ** 6) = 2 ** 68719476736: 8 GiB
        "[x ** x for x in [10 ** 9]]",  # 10 ** (9 * 10 ** 9)
        # Ten nested comprehensions of ten elements: 10 ** 10 elements.
        "[" * 10 + "0" + "".join(f" for x{i} in [0,1,2,3,4,5,6,7,8,9]]" for i in range(10)),
        "[[x, x] for x in [0] * 5]",  # small, but arithmetic on a list
        # A reused value placed twice per level: 2 ** 60 (or 2 ** 24) numbers in a few steps.
        _shared(60),
        _shared(24, leaf="0.5"),
        "[[a, a, a, a] for a in [[b, b, b, b] for b in [[c, c, c, c, c, c, c, c] for c in ["
        + _shared(20)
        + "]]]]",
    ],
)
def test_eval_tag_beyond_bounds_is_refused_at_once(tmp_path, expression):
    base = _yaml(
        tmp_path / "base.yaml",
        f"""\
        MODEL:
          ANCHOR_GENERATOR:
            SIZES: !!python/object/apply:eval ["{expression}"]
        """,
    )
    child = _yaml(tmp_path / "child.yaml", "_BASE_: base.yaml\n")
    out = _refused_in_ten_seconds(child)
    assert str(child) in out and str(base) in out


@pytest.mark.parametrize(
    "expression, value",
    [
        # detectron2's own anchor sizes, and the arithmetic that stays within the bounds.
        ("[[x, x * 2**(1.0/3), x * 2**(2.0/3)] for x in [32, 64, 128, 256, 512]]", None),
        ("[[2 ** 64 - 1, -(3 ** 80), 10 ** 38 / 7, 1.5e300 * 10]]", None),
        ("[[x * y for x in [1, 2, 3] for y in [10, 20]]]", None),
        ("[[y for y in [x, x / 2]] for x in [64, 128]]", None),
        ("((16, 32),)", None),
        ("[[v, v] for v in [[1, 2], (3, 4)]]", [[[1, 2], [1, 2]], [(3, 4), (3, 4)]]),
        (_shared(12), None),  # 4096 numbers
        ("[[2 ** -3, 0.5 ** 2, -4, +4]]", [[0.125, 0.25, -4, 4]]),
    ],
)
def test_eval_tag_within_bounds_gives_pythons_value(tmp_path, expression, value):
    path = _yaml(
        tmp_path / "ok.yaml",
        f"""\
        MODEL:
          ANCHOR_GENERATOR:
            SIZES: !!python/object/apply:eval ["{expression}"]
        """,
    )
    ours = load_config_file(_cfg(), str(path))
    theirs = _cfg()
    theirs.merge_from_file(str(path))  # detectron2: yaml.unsafe_load, Python's eval
    assert ours.dump() == theirs.dump()
    if value is not None:
        assert ours.MODEL.ANCHOR_GENERATOR.SIZES == value


@pytest.mark.parametrize(
    "expression, reason",
    [
        ("[[2 ** 200]]", "more than 128 bits"),
        ("[[1 / 0]]", "division by zero"),
        ("[[1e308 * 10]]", "not finite"),
        ("[[(-8) ** 0.5]]", "complex"),
        ("[x for x in 5]", "iterates over"),
        ("[[x for x in [1] for x in [2]]]", None),  # legal Python: the later x wins
    ],
)
def test_eval_tag_values_are_checked(tmp_path, expression, reason):
    path = _yaml(
        tmp_path / "odd.yaml",
        f"""\
        MODEL:
          ANCHOR_GENERATOR:
            SIZES: !!python/object/apply:eval ["{expression}"]
        """,
    )
    if reason is None:
        assert load_config_file(_cfg(), str(path)).MODEL.ANCHOR_GENERATOR.SIZES == [[2]]
        return
    with pytest.raises(ValueError, match=rf"odd\.yaml.*{reason}"):
        load_config_file(_cfg(), str(path))


def test_eval_tags_of_a_file_share_one_budget(tmp_path):
    # Four nested comprehensions of ten: 10 ** 4 + 10 ** 3 + ... steps, about 11 000 each.
    nested = "[" * 4 + "0" + "".join(f" for x{i} in [0,1,2,3,4,5,6,7,8,9]]" for i in range(4))
    tag = f'!!python/object/apply:eval ["{nested}"]'
    one = _yaml(tmp_path / "one.yaml", f"MODEL:\n  ANCHOR_GENERATOR:\n    SIZES: [{tag}]\n")
    assert len(load_config_file(_cfg(), str(one)).MODEL.ANCHOR_GENERATOR.SIZES[0]) == 10
    ten = _yaml(tmp_path / "ten.yaml", "MODEL:\n  ANCHOR_GENERATOR:\n    SIZES: [" +
                ", ".join([tag] * 10) + "]\n")  # fmt: skip
    with pytest.raises(ValueError, match=r"ten\.yaml.*more than 100000 steps"):
        load_config_file(_cfg(), str(ten))


def test_eval_budget_covers_the_whole_base_chain(tmp_path):
    # Four nested comprehensions of ten: about 23 000 steps and elements each.
    nested = "[" * 4 + "0" + "".join(f" for x{i} in [0,1,2,3,4,5,6,7,8,9]]" for i in range(4))
    tags = ", ".join([f'!!python/object/apply:eval ["{nested}"]'] * 3)
    base = _yaml(tmp_path / "base.yaml", f"MODEL:\n  ANCHOR_GENERATOR:\n    SIZES: [{tags}]\n")
    assert len(load_config_file(_cfg(), str(base)).MODEL.ANCHOR_GENERATOR.SIZES) == 3
    child = _yaml(tmp_path / "child.yaml", f"_BASE_: base.yaml\nMODEL:\n  PIXEL_STD: [{tags}]\n")
    with pytest.raises(ValueError, match=r"child\.yaml.*base\.yaml.*more than 100000"):
        load_config_file(_cfg(), str(child))
    # Naming base.yaml twice reads it once: its tags count once.
    twice = _yaml(tmp_path / "twice.yaml", "_BASE_: [base.yaml, base.yaml]\n")
    assert len(load_config_file(_cfg(), str(twice)).MODEL.ANCHOR_GENERATOR.SIZES) == 3


def test_yaml_aliases_beyond_a_million_values_are_refused_at_once(tmp_path):
    # Each anchor a list of the previous one twice: 2 ** 40 numbers from 40 short lines.
    anchors = ", ".join(["&a0 [1, 1]"] + [f"&a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, 40)])
    path = _yaml(
        tmp_path / "aliases.yaml", f"MODEL:\n  ANCHOR_GENERATOR:\n    SIZES: [{anchors}]\n"
    )
    out = _refused_in_ten_seconds(path)
    assert str(path) in out and "more than 1000000 values" in out
    small = _yaml(tmp_path / "small.yaml", "MODEL:\n  ANCHOR_GENERATOR:\n    SIZES: "
                  "[&a [16, 32], *a, *a]\n")  # fmt: skip
    ours = load_config_file(_cfg(), str(small))
    theirs = _cfg()
    theirs.merge_from_file(str(small))
    assert ours.dump() == theirs.dump()
    assert ours.MODEL.ANCHOR_GENERATOR.SIZES == [[16, 32]] * 3


def test_base_files_named_again_are_read_once_and_bounded(tmp_path):
    # f0 -> f1 four times -> f2 four times ... -> f10: 4 ** 10 files, merged, without the bound.
    for i in range(10):
        _yaml(tmp_path / f"f{i}.yaml", f"_BASE_: {[f'f{i + 1}.yaml'] * 4}\n")
    _yaml(tmp_path / "f10.yaml", "SOLVER:\n  MAX_ITER: 5\n")
    out = _refused_in_ten_seconds(tmp_path / "f0.yaml")
    assert str(tmp_path / "f0.yaml") in out and "beyond 64 _BASE_ entries" in out


def test_base_files_shared_by_siblings_load_as_detectron2_loads_them(tmp_path, monkeypatch):
    _yaml(tmp_path / "common.yaml", "SOLVER:\n  MAX_ITER: 5\n  BASE_LR: 0.5\n"
          "MODEL:\n  ANCHOR_GENERATOR:\n    " + ANCHORS_EVAL + "\n")  # fmt: skip
    _yaml(tmp_path / "a.yaml", "_BASE_: common.yaml\nSOLVER:\n  MAX_ITER: 6\n")
    _yaml(tmp_path / "b.yaml", "_BASE_: [common.yaml, common.yaml]\nSOLVER:\n  BASE_LR: 0.25\n")
    child = _yaml(tmp_path / "child.yaml", "_BASE_: [a.yaml, b.yaml, a.yaml]\n")
    theirs = _cfg()
    theirs.merge_from_file(str(child))
    from retinanet_plugin import config_file

    opened = []
    real_open = config_file.PathManager.open

    def counting_open(path, *args, **kwargs):
        opened.append(os.path.basename(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(config_file.PathManager, "open", counting_open)
    ours = load_config_file(_cfg(), str(child))
    assert ours.dump() == theirs.dump()
    assert (ours.SOLVER.MAX_ITER, ours.SOLVER.BASE_LR) == (6, 0.5)  # the last a.yaml wins
    assert sorted(opened) == ["a.yaml", "b.yaml", "child.yaml", "common.yaml"]
    # A chain of exactly 64 _BASE_ entries still loads.
    for i in range(64):
        _yaml(tmp_path / "long" / f"g{i}.yaml", f"_BASE_: g{i + 1}.yaml\n")
    _yaml(tmp_path / "long" / "g64.yaml", "SOLVER:\n  MAX_ITER: 9\n")
    assert load_config_file(_cfg(), str(tmp_path / "long" / "g0.yaml")).SOLVER.MAX_ITER == 9
    _yaml(tmp_path / "long" / "g64.yaml", "_BASE_: g65.yaml\n")
    _yaml(tmp_path / "long" / "g65.yaml", "SOLVER:\n  MAX_ITER: 9\n")
    with pytest.raises(ValueError, match=r"g0\.yaml.*g64\.yaml.*beyond 64 _BASE_ entries"):
        load_config_file(_cfg(), str(tmp_path / "long" / "g0.yaml"))


# ---- The reader agrees with detectron2's merge_from_file on detectron2's own configs ----------

_ZOO = Path(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml")).parents[1]


@pytest.mark.parametrize(
    "path", sorted(_ZOO.rglob("*.yaml")), ids=lambda p: str(p.relative_to(_ZOO))
)
def test_model_zoo_configs_load_as_detectron2_loads_them(path):
    theirs = _cfg()
    theirs.merge_from_file(str(path))
    assert load_config_file(_cfg(), str(path)).dump() == theirs.dump()


def test_base_as_a_list_and_tuples_load_as_detectron2_loads_them(tmp_path):
    # fvcore merges a list of _BASE_ files in order, later ones winning.
    _yaml(tmp_path / "a.yaml", "SOLVER:\n  MAX_ITER: 5\n  BASE_LR: 0.5\n")
    _yaml(tmp_path / "b" / "b.yaml", "SOLVER:\n  MAX_ITER: 6\nINPUT:\n  MIN_SIZE_TRAIN: [1, 2]\n")
    child = _yaml(tmp_path / "child.yaml", '_BASE_: ["a.yaml", "b/b.yaml"]\nSOLVER:\n'
                  '  STEPS: !!python/object/apply:eval ["(3, 4)"]\n')  # fmt: skip
    ours = load_config_file(_cfg(), str(child))
    theirs = _cfg()
    theirs.merge_from_file(str(child))
    assert ours.dump() == theirs.dump()
    assert (ours.SOLVER.MAX_ITER, ours.SOLVER.BASE_LR, ours.SOLVER.STEPS) == (6, 0.5, (3, 4))


# ---- Issue 19: a copy of the example config made outside configs/ ------------------------------


def test_copied_example_names_its_missing_base_and_the_fix(tmp_path):
    copy = tmp_path / "my_config.yaml"
    shutil.copy(REPO / "configs" / "custom_coco_example.yaml", copy)
    with pytest.raises(FileNotFoundError) as raised:
        load_config(str(copy))
    message = str(raised.value)
    assert "_BASE_ 'demo_deepforest_mobilenet_v2_fpn.yaml'" in message  # the entry
    assert str(copy) in message  # the file that names it
    assert f"looked for in {tmp_path} " in message  # the folder
    # The fix: the base's absolute path in this checkout.
    assert f'_BASE_: "{REPO / "configs" / "demo_deepforest_mobilenet_v2_fpn.yaml"}"' in message


# ---- Review: paths of _BASE_ normalised, deep nesting and unhashable keys named ----------------


@pytest.mark.parametrize("entry", ["./a.yaml", "a.yaml", "../d/a.yaml", "./././a.yaml"])
def test_a_file_whose_base_is_itself_is_refused_at_once(tmp_path, monkeypatch, entry):
    a = _yaml(tmp_path / "d" / "a.yaml", f"_BASE_: {entry}\n")
    opened = []
    real_open = config_file.PathManager.open
    monkeypatch.setattr(config_file.PathManager, "open",
                        lambda path, *args: opened.append(path) or real_open(path, *args))
    with pytest.raises(ValueError) as raised:
        read_config_file(str(a))
    message = str(raised.value)
    assert f"{a} includes itself through _BASE_" in message and "beyond" not in message
    assert "./" not in message and len(opened) == 1


def test_a_base_named_by_different_spellings_is_read_once(tmp_path, monkeypatch):
    _yaml(tmp_path / "d" / "b.yaml", "SOLVER:\n  MAX_ITER: 5\n")
    a = _yaml(tmp_path / "d" / "a.yaml", "_BASE_: [b.yaml, ./b.yaml, ../d/b.yaml, .//b.yaml]\n")
    opened = []
    real_open = config_file.PathManager.open
    monkeypatch.setattr(config_file.PathManager, "open",
                        lambda path, *args: opened.append(path) or real_open(path, *args))
    read = read_config_file(str(a))
    assert opened == [str(a), str(tmp_path / "d" / "b.yaml")]
    assert [base.path for base in read.bases] == [str(tmp_path / "d" / "b.yaml")] * 4
    assert read.merged()["SOLVER"]["MAX_ITER"] == 5


def test_yaml_nested_too_deep_is_refused_naming_the_file(tmp_path):
    path = _yaml(tmp_path / "deep.yaml", "A: " + "[" * 20_000 + "]" * 20_000 + "\n")
    out = _refused_in_ten_seconds(path)
    assert str(path) in out and "nest" in out and "refused" in out


@pytest.mark.parametrize(
    "text, said",
    [
        ("? [1, 2]\n: 3\n", "a list or mapping as a mapping key"),
        ("? {a: 1}\n: 3\n", "a list or mapping as a mapping key"),
        ("A: {<<: 1}\n", "expected a mapping or list of mappings for merging"),
    ],
)
def test_yaml_that_builds_no_config_is_named_for_what_it_is(tmp_path, text, said):
    path = _yaml(tmp_path / "odd.yaml", text)
    with pytest.raises(ValueError) as raised:
        read_config_file(str(path))
    message = str(raised.value)
    assert str(path) in message and said in message and "refused" in message
    assert "could run code" not in message and "YAML tag" not in message
