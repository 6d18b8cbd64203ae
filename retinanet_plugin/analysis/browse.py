"""Training images as the model receives them: after the plugin's own mapper and its
augmentations, with their boxes, class names and crowd regions drawn.

The images come from the training loader's own pieces: the dataset dicts of
``build_detection_train_loader``'s config (``DATASETS.TRAIN`` with
``DATALOADER.FILTER_EMPTY_ANNOTATIONS``; a ``.py`` config's ``dataloader.train.dataset``) and
the mapper :func:`retinanet_plugin.data.build_dataset_mapper` ``(cfg, is_train=True)`` (a
``.py`` config's ``dataloader.train.mapper``): resize and scale jitter, flips, quarter turns,
colour jitter, crowd regions kept by ``MODEL.RETINANET.CROWD_IGNORE``. Each image is mapped with
NumPy's global generator seeded with ``[seed, index]`` (the augmentations draw from it, as in
training), so a picture can be reproduced and compared with the mapper's output. With
``source="dataset"`` the dataset dicts are drawn as registered, without the mapper: the place to
see a wrong box format.
"""

import logging
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import cv2
import numpy as np

from detectron2.config import CfgNode, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.structures import BoxMode

from ..data import build_dataset_mapper
from ..data.mapper import read_image
from ..visualize import _CLASS_COLORS, draw_detections, tile_grid

__all__ = [
    "CROWD_COLOR",
    "Sample",
    "browse_samples",
    "draw_sample",
    "save_browse",
    "train_dataset",
    "train_mapper",
]

logger = logging.getLogger(__name__)

# BGR grey of crowd regions (ignored in training), filled half-transparent.
CROWD_COLOR = (128, 128, 128)
# Above this many boxes an image's boxes are not labelled one by one: the legend names the
# colours (dense crowns would be hidden under their labels).
MAX_LABELLED_BOXES = 40


class Sample(NamedTuple):
    """One image as drawn.

    Attributes:
        image: (H, W, 3) uint8 BGR, as the model receives it (after the mapper) or as read.
        boxes: (N, 4) float XYXY pixels of ``image``.
        classes: (N,) int contiguous class indices.
        crowd: (N,) bool, True for a crowd region (ignored in training).
        record: the dataset dict it came from.
        steps: what happened to the image, e.g. ``["resize 400x400->437x437", "h-flip"]``.
        dropped_crowd: crowd annotations of the record that the mapper dropped
            (``MODEL.RETINANET.CROWD_IGNORE`` off).
        seed: the ``[seed, index]`` NumPy's generator was seeded with (None: not mapped).
    """

    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    crowd: np.ndarray
    record: Dict[str, Any]
    steps: List[str]
    dropped_crowd: int
    seed: Optional[Tuple[int, int]] = None


def _is_yaml(cfg: Any) -> bool:
    return isinstance(cfg, CfgNode)


def train_mapper(cfg: Any) -> Any:
    """The training loader's mapper: ``build_dataset_mapper(cfg, is_train=True)``, or a ``.py``
    config's ``dataloader.train.mapper``."""
    if _is_yaml(cfg):
        return build_dataset_mapper(cfg, is_train=True)
    return instantiate(cfg.dataloader.train.mapper)


def train_dataset(cfg: Any, dataset: Optional[str] = None) -> Tuple[List[Dict[str, Any]], str]:
    """The training loader's dataset dicts and their name(s).

    Args:
        dataset: a registered dataset's name to take instead, all of its dicts, unfiltered.

    Returns:
        (dataset dicts, name: the dataset or the training sets joined with "+").
    """
    if dataset is not None:
        if dataset not in DatasetCatalog.list():
            raise KeyError(f"--dataset {dataset}: not a registered dataset; registered: "
                           f"{sorted(DatasetCatalog.list())}")
        return list(DatasetCatalog.get(dataset)), dataset
    if _is_yaml(cfg):
        from detectron2.data import build_detection_train_loader

        # build_detection_train_loader's own config reader: the sets, filtering and proposals
        # training uses.
        kwargs = build_detection_train_loader.from_config(cfg, mapper=lambda x: x)
        return list(kwargs["dataset"]), "+".join(cfg.DATASETS.TRAIN)
    node = cfg.dataloader.train.dataset
    names = node.get("names", "")
    names = [names] if isinstance(names, str) else list(names)
    return list(instantiate(node)), "+".join(names)


def _class_names(dataset_name: str) -> List[str]:
    for name in dataset_name.split("+"):
        if name in DatasetCatalog.list():
            classes = MetadataCatalog.get(name).get("thing_classes")
            if classes:
                return list(classes)
    return []


class _RecordingAugmentations:
    """The mapper's ``AugmentationList``, called as it is, keeping the transforms it returned
    (to say what happened to each image)."""

    def __init__(self, augmentations: T.AugmentationList):
        self.augmentations = augmentations
        self.last: Optional[T.TransformList] = None

    def __call__(self, aug_input: T.AugInput) -> T.TransformList:
        self.last = self.augmentations(aug_input)
        return self.last

    def __getattr__(self, name: str) -> Any:
        return getattr(self.augmentations, name)


def _steps(augs: Sequence[T.Augmentation], transforms: Optional[T.TransformList]) -> List[str]:
    """Short words for the transforms applied to one image."""
    if transforms is None:
        return []
    tfms = list(transforms.transforms)
    pairs = zip(augs, tfms) if len(augs) == len(tfms) else ((None, t) for t in tfms)
    words = []
    for aug, t in pairs:
        kind = type(t).__name__
        if kind == "NoOpTransform":
            continue
        if kind == "ResizeTransform":
            words.append(f"resize {t.h}x{t.w}->{t.new_h}x{t.new_w}")
        elif kind == "HFlipTransform":
            words.append("h-flip")
        elif kind == "VFlipTransform":
            words.append("v-flip")
        elif kind == "Rot90Transform":
            words.append(f"rotate {90 * t.k} deg")
        elif kind == "BlendTransform" and aug is not None:
            what = type(aug).__name__.replace("Random", "").lower()
            words.append(f"{what} x{float(t.dst_weight):.2f}" if np.isscalar(t.dst_weight)
                         else what)
        else:
            words.append(kind.replace("Transform", "").lower())
    return words


def _describe(aug: T.Augmentation) -> str:
    """detectron2's repr of an augmentation (its arguments), or its class name where that repr
    is Python's default."""
    text = repr(aug)
    return f"{type(aug).__name__}()" if " object at 0x" in text else text


def _mapped(mapper: Any, record: Dict[str, Any], seed: Sequence[int]) -> Sample:
    state = np.random.get_state()
    np.random.seed(list(seed))
    try:
        mapped = mapper(record)
    finally:
        np.random.set_state(state)
    if mapped is None:
        raise OSError(f"{record.get('file_name')}: the mapper skipped the image (unreadable)")
    image = convert_image_to_rgb(mapped["image"].permute(1, 2, 0).numpy(), mapper.image_format)
    image = np.ascontiguousarray(image[:, :, ::-1]).astype(np.uint8)  # RGB -> BGR for OpenCV
    instances = mapped.get("instances")
    if instances is None or not len(instances):
        boxes, classes, crowd = np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0, bool)
    else:
        boxes = instances.gt_boxes.tensor.numpy().astype(np.float64)
        classes = instances.gt_classes.numpy()
        crowd = (instances.gt_is_crowd.numpy() if instances.has("gt_is_crowd")
                 else np.zeros(len(instances), bool))
    recorder = mapper.augmentations
    augs = list(getattr(recorder.augmentations, "augs", []))
    raw_crowd = sum(a.get("iscrowd", 0) == 1 for a in record.get("annotations", ()))
    return Sample(image, boxes, classes, crowd, record, _steps(augs, recorder.last),
                  raw_crowd - int(crowd.sum()) if not getattr(mapper, "keep_crowd", False)
                  else 0, (int(seed[0]), int(seed[1])))


def _raw(record: Dict[str, Any]) -> Sample:
    image = read_image(record["file_name"], format="BGR")
    anns = record.get("annotations", [])
    boxes = np.array([BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)
                      for a in anns], dtype=np.float64).reshape(-1, 4)
    classes = np.array([a["category_id"] for a in anns], dtype=np.int64)
    crowd = np.array([a.get("iscrowd", 0) == 1 for a in anns], dtype=bool)
    return Sample(np.ascontiguousarray(image), boxes, classes, crowd, record, [], 0)


def browse_samples(
    cfg: Any,
    num_images: int = 8,
    *,
    source: str = "mapper",
    seed: int = 0,
    shuffle: bool = False,
    dataset: Optional[str] = None,
) -> Tuple[List[Sample], Dict[str, Any]]:
    """The first ``num_images`` training images (or a random choice of them, ``shuffle``).

    Args:
        cfg: a YAML ``CfgNode`` or a ``.py`` config (datasets registered, as ``load_cfg`` does).
        source: "mapper" (through the training mapper) or "dataset" (the dicts as registered).
        seed: image ``i`` is mapped with NumPy's global generator seeded with ``[seed, i]``;
            also the seed of ``shuffle``.
        dataset: a registered dataset to draw instead of the training sets.

    Returns:
        (samples, about): ``about`` holds ``dataset`` (name), ``source``, ``augmentations`` (the
        mapper's list, as text) and ``class_names``.
    """
    if source not in ("mapper", "dataset"):
        raise ValueError(f"source must be 'mapper' or 'dataset', got {source!r}")
    if num_images <= 0:
        raise ValueError(f"the number of images must be > 0, got {num_images}")
    records, name = train_dataset(cfg, dataset)
    if not records:
        raise ValueError(f"dataset {name} has no images")
    order = list(range(len(records)))
    if shuffle:
        np.random.default_rng(seed).shuffle(order)
    chosen = order[:num_images]
    about: Dict[str, Any] = {"dataset": name, "source": source, "class_names": _class_names(name),
                             "augmentations": []}
    if source == "dataset":
        return [_raw(records[i]) for i in chosen], about
    mapper = train_mapper(cfg)
    mapper.augmentations = _RecordingAugmentations(mapper.augmentations)
    about["augmentations"] = [_describe(a) for a in mapper.augmentations.augmentations.augs]
    about["keep_crowd"] = bool(getattr(mapper, "keep_crowd", False))
    return [_mapped(mapper, records[i], (seed, i)) for i in chosen], about


def _text_size(text: str, scale: float, thickness: int) -> Tuple[int, int, int]:
    (w, h), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    return w, h, baseline


def _wrap(text: str, width: int, scale: float) -> List[str]:
    """``text`` broken at spaces into lines of at most ``width`` pixels (a longer word, e.g. a
    file name, is cut between characters); continuation lines are indented."""
    lines: List[str] = []
    line = ""
    words: List[str] = []
    for word in text.split(" "):
        while len(word) > 1 and _text_size("    " + word, scale, 1)[0] > width:
            cut = len(word) - 1
            while cut > 1 and _text_size("    " + word[:cut], scale, 1)[0] > width:
                cut -= 1
            words.append(word[:cut])
            word = word[cut:]
        words.append(word)
    for word in words:
        candidate = f"{line} {word}" if line else word
        if line and _text_size(candidate, scale, 1)[0] > width:
            lines.append(line)
            line = "    " + word
        else:
            line = candidate
    return lines + [line]


def _header(width: int, lines: Sequence[Tuple[str, Optional[Tuple[int, int, int]]]],
            scale: float) -> np.ndarray:
    """Lines of white text on black, each optionally led by a colour swatch, wrapped to
    ``width`` so that no text is cut at the edge."""
    _, h, baseline = _text_size("Ag", scale, 1)
    step = h + baseline + 6
    rows = []
    for text, swatch in lines:
        indent = 6 + (h + 6 if swatch is not None else 0)
        for j, part in enumerate(_wrap(text, width - indent - 6, scale)):
            rows.append((part, swatch if j == 0 else None, indent))
    band = np.zeros((step * len(rows) + 6, width, 3), np.uint8)
    for i, (text, swatch, x) in enumerate(rows):
        y = 4 + i * step
        if swatch is not None:
            cv2.rectangle(band, (6, y + 1), (6 + h, y + h + 1), swatch, cv2.FILLED)
        cv2.putText(band, text, (x, y + h), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return band


def draw_sample(
    sample: Sample, about: Dict[str, Any], *, min_side: int = 600, scale: Optional[int] = None
) -> Tuple[np.ndarray, int, int]:
    """One image with its boxes (class colours, class names when at most
    :data:`MAX_LABELLED_BOXES`), crowd regions grey and half-filled, labelled "crowd: ignored",
    under a header: file and image id, dataset and source, what the mapper did, a colour legend.

    Returns:
        (picture, scale, header height): the image is enlarged by the whole factor ``scale``
        (so that its shorter side reaches ``min_side``) and sits below the header; a box
        ``(x0, y0, x1, y1)`` of the sample is drawn at ``(x0 * scale, header + y0 * scale, ...)``.
        ``scale`` given: that factor instead.
    """
    image = sample.image
    if scale is None:
        scale = _scale([sample], min_side)
    if scale > 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    boxes = sample.boxes * scale
    names = list(about.get("class_names") or [])
    top = int(sample.classes.max(initial=-1)) + 1
    names += [f"class {i}" for i in range(len(names), top)]
    crowd = sample.crowd.astype(bool)
    if crowd.any():
        shade = image.copy()
        for x0, y0, x1, y1 in boxes[crowd].round().astype(int):
            cv2.rectangle(shade, (x0, y0), (x1, y1), CROWD_COLOR, cv2.FILLED)
        image = cv2.addWeighted(shade, 0.5, image, 0.5, 0)
        image = draw_detections(image, boxes[crowd], np.ones(int(crowd.sum())),
                                sample.classes[crowd], names, color=CROWD_COLOR,
                                labels=["crowd: ignored"] * int(crowd.sum()))
    plain = ~crowd
    labels = None if int(plain.sum()) <= MAX_LABELLED_BOXES else [""] * int(plain.sum())
    if labels is None:
        labels = [names[int(c)] for c in sample.classes[plain]]
    image = draw_detections(image, boxes[plain], np.ones(int(plain.sum())),
                            sample.classes[plain], names, labels=labels)
    width = image.shape[1]
    font = 0.45 if width < 900 else 0.6
    record = sample.record
    name = os.path.basename(str(record.get("file_name", "")))
    lines: List[Tuple[str, Optional[Tuple[int, int, int]]]] = [
        (f"{name} (image id {record.get('image_id')})", None),
    ]
    h0, w0 = record.get("height"), record.get("width")
    if about["source"] == "dataset":
        lines.append((f"{about['dataset']}: dataset dicts as registered, no mapper", None))
    else:
        seed = ",".join(str(v) for v in sample.seed or ())
        lines.append((f"{about['dataset']} through the training mapper (NumPy seed [{seed}])",
                      None))
        lines.append(("applied: " + (", ".join(sample.steps) or "nothing"), None))
    size = f"{sample.image.shape[0]}x{sample.image.shape[1]} px"
    if h0 and w0 and about["source"] == "mapper":
        size = f"file {h0}x{w0} px -> {size} after the mapper"
    lines.append((size + (f" (shown x{scale})" if scale > 1 else ""), None))
    counts = np.bincount(sample.classes[plain], minlength=len(names))
    for k, n in enumerate(counts):
        if n:
            lines.append((f"{names[k]}: {n} box{'es' if n > 1 else ''}",
                          _CLASS_COLORS[k % len(_CLASS_COLORS)]))
    if crowd.any():
        lines.append((f"crowd regions, ignored in training (MODEL.RETINANET.CROWD_IGNORE): "
                      f"{int(crowd.sum())}", CROWD_COLOR))
    if sample.dropped_crowd:
        lines.append((f"{sample.dropped_crowd} crowd regions dropped by the mapper "
                      "(MODEL.RETINANET.CROWD_IGNORE off)", None))
    if not len(sample.boxes):
        lines.append(("no boxes", None))
    header = _header(width, lines, font)
    return np.concatenate([header, image], axis=0), scale, header.shape[0]


def save_browse(
    samples: Sequence[Sample],
    about: Dict[str, Any],
    output: str,
    *,
    grid: bool = False,
    columns: int = 4,
    min_side: int = 600,
) -> List[str]:
    """Writes each drawn sample as ``<output>/<index>_<file stem>.jpg``, or with ``grid`` one
    ``<output>/browse_<source>.jpg`` with a title band (dataset, source, the mapper's
    augmentations). Returns the paths written."""
    os.makedirs(output, exist_ok=True)
    # One factor for all: the scale jitter stays visible as a difference in size.
    scale = _scale(samples, min_side)
    tiles = [draw_sample(s, about, scale=scale)[0] for s in samples]
    if not grid:
        paths = []
        for i, (sample, tile) in enumerate(zip(samples, tiles)):
            stem = os.path.splitext(os.path.basename(str(sample.record.get("file_name"))))[0]
            path = os.path.join(output, f"{i:03d}_{stem}.jpg")
            _write(path, tile)
            paths.append(path)
        return paths
    picture = tile_grid(tiles, columns)
    title = [(f"{about['dataset']}: {len(samples)} training images "
              + ("as registered (no mapper)" if about["source"] == "dataset" else
                 "after the training mapper (build_dataset_mapper, is_train=True)"), None)]
    if about["source"] == "mapper":
        title.append(("augmentations: " + ", ".join(about["augmentations"]), None))
    picture = np.concatenate([_header(picture.shape[1], title, 0.7), picture], axis=0)
    path = os.path.join(output, f"browse_{about['source']}.jpg")
    _write(path, picture)
    return [path]


def _scale(samples: Sequence[Sample], min_side: int) -> int:
    """The whole factor that brings the smallest shorter side to ``min_side`` (at least 1)."""
    shortest = min(min(s.image.shape[:2]) for s in samples)
    return max(1, int(np.ceil(min_side / max(1, shortest))))


def _write(path: str, image: np.ndarray) -> None:
    if not cv2.imwrite(path, image, [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise OSError(f"cannot write {path}")
