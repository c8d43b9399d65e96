"""Weak (image-level) labels from any registered dataset, and the checks of WSOD inputs.

``<name>_weak`` (registered on demand by ``register_weak_names``, like ``_blur<N>``): the records
of ``<name>`` (the built-in data, a COCO JSON, a VOC folder, anything registered) with their
``annotations`` removed and ``image_labels`` (the sorted contiguous class ids of its objects not
marked ``difficult``) added: the model never sees a box. A record that already carries
``image_labels`` (a dataset with real image tags) keeps them. The boxes stay with ``<name>``,
which the metadata key ``weak_label_source`` names for the evaluator (CorLoc on the training
split, mAP on a ``_weak`` test split).
"""
import os
import pickle
import re

import numpy as np

from ..data.register import DatasetFormatError, register_derived_dataset

_NAME = re.compile(r"^(?P<base>.+)_weak$")


def _describe(record):
    return f"image id {record.get('image_id')} ({record.get('file_name')})"


def check_image_labels(record, num_classes, dataset):
    labels = record["image_labels"]
    bad = [c for c in labels if not (isinstance(c, (int, np.integer)) and 0 <= c < num_classes)]
    if bad:
        raise DatasetFormatError(
            f"{dataset}: {_describe(record)} has class tags {bad} outside the dataset's "
            f"{num_classes} categories (contiguous ids 0..{num_classes - 1})"
        )


def weak_records(records, name, num_classes):
    out = []
    for record in records:
        weak = {k: v for k, v in record.items() if k != "annotations"}
        if "image_labels" not in weak:
            # as OICR's roidb without difficult objects: a class whose objects in the image are all
            # `difficult` (VOC) is no tag; an image left without tags trains as all-negative
            weak["image_labels"] = sorted({a["category_id"] for a in record.get("annotations", [])
                                           if not a.get("difficult", 0)})
        check_image_labels(weak, num_classes, name)
        weak["image_labels"] = [int(c) for c in weak["image_labels"]]
        out.append(weak)
    return out


def register_weak(base):
    from detectron2.data import MetadataCatalog

    name = f"{base}_weak"

    def transform(records):
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is None:
            raise DatasetFormatError(f"{name}: the dataset '{base}' has no thing_classes metadata")
        return weak_records(records, name, len(classes))

    register_derived_dataset(name, base, transform, "weakly label")
    MetadataCatalog.get(name).set(weak_label_source=base)
    return name


def register_weak_names(names):
    """Register every ``<registered name>_weak`` in ``names``; returns the ones registered."""
    return [register_weak(m["base"]) for m in map(_NAME.match, names) if m]


def ground_truth_dataset(name):
    """The dataset holding ``name``'s boxes: its weak-label source, or itself."""
    from detectron2.data import MetadataCatalog

    return MetadataCatalog.get(name).get("weak_label_source", name)


def check_wsod_dataset(name, proposal_file, training):
    """Fail naming the file or the image: a missing proposal file, an image without (valid)
    proposals, training records with boxes or without tags."""
    from detectron2.data import DatasetCatalog

    if not os.path.isfile(proposal_file):
        base = _NAME.match(name)["base"] if _NAME.match(name) else name
        raise FileNotFoundError(
            f"proposal file {proposal_file} of dataset '{name}' does not exist; write it with "
            f"python tools/selective_search.py --dataset {base}"
        )
    records = DatasetCatalog.get(name)
    with open(proposal_file, "rb") as f:
        proposals = pickle.load(f, encoding="latin1")
    ids = proposals.get("ids", proposals.get("indexes"))
    if ids is None or "boxes" not in proposals:
        raise DatasetFormatError(f"{proposal_file} is not a proposal file (needs 'ids' and 'boxes')")
    index = {str(i): k for k, i in enumerate(ids)}
    for record in records:
        k = index.get(str(record["image_id"]))
        boxes = None if k is None else np.asarray(proposals["boxes"][k]).reshape(-1, 4)
        if boxes is None or not ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).any():
            raise DatasetFormatError(
                f"{name}: {_describe(record)} has no proposal with a positive area in {proposal_file}"
            )
        if training:
            if "annotations" in record or "image_labels" not in record:
                raise DatasetFormatError(
                    f"{name}: {_describe(record)} carries boxes or no image_labels; weakly "
                    f"supervised training takes image-level labels only: train on '{name}_weak'"
                )
    return records
