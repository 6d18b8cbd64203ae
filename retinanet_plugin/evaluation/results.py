"""Model outputs to COCO results: the one conversion shared by evaluation, predict and exports.

detectron2's ``COCOEvaluator`` turns each image's ``Instances`` into COCO results with
``instances_to_coco_json`` (XYXY boxes to XYWH, class indices as ``category_id``), then, once
for the whole set, replaces every ``category_id`` by the dataset's own id through the reverse of
the metadata's ``thing_dataset_id_to_contiguous_id`` (when the metadata has one). The functions
here do the same two steps with detectron2's own function, per image, so a tool that writes
``coco_instances_results.json`` writes what the evaluator writes for the same detections, and
pycocotools scores both the same.
"""

from typing import Any, Dict, List, Mapping, Optional

from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Instances

__all__ = ["coco_category_ids", "instances_to_coco_results"]


def coco_category_ids(metadata: Any) -> Optional[Dict[int, int]]:
    """The dataset category id of each contiguous class index, as ``COCOEvaluator`` maps them.

    Args:
        metadata: a dataset's ``MetadataCatalog`` entry (or any object with ``get``). For a COCO
            JSON dataset, detectron2 sets ``thing_dataset_id_to_contiguous_id`` when it loads
            the file; detectron2's builtin COCO sets have it without any file.

    Returns:
        dict[int, int]: contiguous class -> category id; None when the metadata has no
        ``thing_dataset_id_to_contiguous_id`` (``COCOEvaluator`` then writes the class indices).

    Raises:
        ValueError: the contiguous ids are not 0..K-1 (``COCOEvaluator`` asserts the same).
    """
    mapping = metadata.get("thing_dataset_id_to_contiguous_id")
    if mapping is None:
        return None
    contiguous = list(mapping.values())
    if not contiguous or min(contiguous) != 0 or max(contiguous) != len(contiguous) - 1:
        raise ValueError(
            "thing_dataset_id_to_contiguous_id must map onto 0..K-1 (K categories), got "
            f"{dict(mapping)}"
        )
    return {v: k for k, v in mapping.items()}


def instances_to_coco_results(
    instances: Instances, image_id: int, category_ids: Optional[Mapping[int, int]] = None
) -> List[Dict[str, Any]]:
    """One image's detections as COCO results, exactly as ``COCOEvaluator`` saves them.

    Args:
        instances: the model's output for the image, boxes in original image pixels
            (``pred_boxes`` XYXY, ``scores``, ``pred_classes``), on any device.
        image_id: the image's id (the dataset's, for results to be scored against it).
        category_ids: contiguous class -> category id (:func:`coco_category_ids`); None keeps the
            class indices, as ``COCOEvaluator`` does for a dataset without such a mapping.

    Returns:
        list[dict]: ``image_id``, ``category_id``, ``bbox`` (XYWH), ``score`` per detection, in
        the order of ``instances``.

    Raises:
        ValueError: a detection's class has no category id.
    """
    results = instances_to_coco_json(instances.to("cpu"), image_id)
    if category_ids is None:
        return results
    for result in results:
        contiguous = result["category_id"]
        if contiguous not in category_ids:
            raise ValueError(
                f"a detection has class {contiguous}, but the dataset's classes are "
                f"0..{len(category_ids) - 1}"
            )
        result["category_id"] = category_ids[contiguous]
    return results
