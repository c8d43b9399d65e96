"""Register user datasets (COCO-format JSON, Pascal VOC folders) from the command line.

``tools/train_net.py --coco-dataset NAME JSON IMAGE_DIR --voc-dataset NAME DIR SPLIT`` calls
these before the config is used, so ``DATASETS.TRAIN ("NAME",)`` works without writing Python.
Malformed input fails here with a message naming the file and the offending image/annotation.
"""
import functools
import json
import logging
import os
import re
import xml.etree.ElementTree as ET

logger = logging.getLogger(__name__)


def copy_new_metadata(source, target, skip=()):
    """Copy to dataset ``target``'s metadata what ``source``'s has and it lacks (but ``skip``)."""
    from detectron2.data import MetadataCatalog

    have = MetadataCatalog.get(target).as_dict()
    new = {k: v for k, v in MetadataCatalog.get(source).as_dict().items() if k not in have and k not in skip}
    MetadataCatalog.get(target).set(**new)


def register_derived_dataset(name, base, transform, purpose, skip_metadata=()):
    """Register ``name``: the records of the registered dataset ``base`` through
    ``transform(records)``, with ``base``'s metadata but the keys in ``skip_metadata`` (the
    blurred and the adversarial copies, the slices). ``purpose`` words the error for an unknown
    base ("blur", "attack")."""
    from detectron2.data import DatasetCatalog

    if name in DatasetCatalog.list():
        return name
    if base not in DatasetCatalog.list():
        raise KeyError(f"cannot {purpose} '{base}' ({name}): no such registered dataset")

    def load():
        records = DatasetCatalog.get(base)
        # Loading can add metadata to the base dataset (load_coco_json sets the category-id map
        # that COCOEvaluator needs): copy what is new, or the copy would be scored with unmapped
        # class ids.
        copy_new_metadata(base, name, skip_metadata)
        return transform(records)

    DatasetCatalog.register(name, load)
    copy_new_metadata(base, name, skip_metadata)
    return name


# "<registered name>_first<N>": the dataset's first N records, in its order (a quick evaluation or
# smoke-test slice); derived copies of it chain after it ("demo_shapes_val_first20_blur3").
_FIRST = re.compile(r"^(?P<base>.+?)_first(?P<count>[0-9]+)(?=$|_)")


def register_first_names(names):
    """Register the ``<registered name>_first<N>`` slice named by, or at the start of, each name
    in ``names``; returns the slices registered. A slice has no ``json_file``: COCOEvaluator
    builds its ground truth from the slice's own records (the base's file would count every
    image left out as missed)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    done = []
    registered = DatasetCatalog.list()
    for name in names:
        match = _FIRST.match(name)
        if not match or name in registered:
            continue
        base, count = match["base"], int(match["count"])
        if base not in registered and any(name.startswith(r + "_") for r in registered):
            continue  # a copy of a registered dataset whose own name contains "_first<N>"
        if base in registered and MetadataCatalog.get(base).get("evaluator_type") == "pascal_voc":
            raise ValueError(f"{match[0]}: slices of a VOC dataset are not supported (Detectron2's VOC "
                             f"evaluator scores every image of '{base}''s split file)")
        if count < 1:
            raise ValueError(f"{match[0]}: a slice needs at least one image (_first<N>, N >= 1)")

        def first(records, base=base, count=count):
            if len(records) < count:
                raise ValueError(f"{base}_first{count}: '{base}' has only {len(records)} images")
            return records[:count]

        done.append(register_derived_dataset(match[0], base, first, "slice", skip_metadata=("json_file",)))
    return done


class DatasetFormatError(ValueError):
    """An annotation file or dataset folder is not what its format requires."""


def validate_coco_json(json_file):
    """Check the parts of a COCO detection JSON that Detectron2 relies on; return its category names.

    Raises DatasetFormatError naming the file and the bad image or annotation id.
    """
    try:
        with open(json_file) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetFormatError(f"COCO annotation file not found: {json_file}") from None
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{json_file} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DatasetFormatError(
            f"{json_file} is not a COCO detection file: it needs top-level 'images', "
            f"'annotations' and 'categories' (found {keys})"
        )
    cat_ids = {c.get("id") for c in data["categories"]}
    if not cat_ids:
        raise DatasetFormatError(f"{json_file}: 'categories' is empty")
    image_ids = set()
    for img in data["images"]:
        for key in ("id", "file_name", "height", "width"):
            if key not in img:
                raise DatasetFormatError(f"{json_file}: image {img.get('id', img)} lacks '{key}'")
        image_ids.add(img["id"])
    for ann in data["annotations"]:
        ann_id = ann.get("id")
        if ann.get("image_id") not in image_ids:
            raise DatasetFormatError(
                f"{json_file}: annotation id {ann_id} refers to image_id {ann.get('image_id')}, "
                "which is not in 'images'"
            )
        if ann.get("category_id") not in cat_ids:
            raise DatasetFormatError(
                f"{json_file}: annotation id {ann_id} (image id {ann.get('image_id')}) has "
                f"category_id {ann.get('category_id')}, which is not in 'categories' "
                f"(ids {sorted(cat_ids)})"
            )
        bbox = ann.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
                and all(isinstance(v, (int, float)) for v in bbox)):
            raise DatasetFormatError(
                f"{json_file}: annotation id {ann_id} (image id {ann.get('image_id')}) has "
                f"bbox {bbox!r}; expected [x, y, width, height]"
            )
        if bbox[2] < 0 or bbox[3] < 0:
            raise DatasetFormatError(
                f"{json_file}: annotation id {ann_id} (image id {ann.get('image_id')}) has an "
                f"inverted box {bbox} (negative width or height)"
            )
    cats = sorted(data["categories"], key=lambda c: c["id"])
    return [c["name"] for c in cats]


class CheckedDatasetMapper:
    """Wraps a dataset mapper: an image that cannot be read fails with its file and image id."""

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, dataset_dict):
        try:
            return self.mapper(dataset_dict)
        except Exception as e:
            raise DatasetFormatError(
                f"cannot load image id {dataset_dict.get('image_id')} from "
                f"{dataset_dict.get('file_name')}: {type(e).__name__}: {e}"
            ) from e


def _check_image_files(dataset_dicts, source):
    for d in dataset_dicts:
        if not os.path.isfile(d["file_name"]):
            raise DatasetFormatError(
                f"{source}: image id {d.get('image_id')} points to a missing file {d['file_name']}"
            )
    return dataset_dicts


def register_coco_folder(name, json_file, image_root):
    """Register a COCO-format detection dataset under ``name`` (validated now, loaded lazily)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    classes = validate_coco_json(json_file)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(
        name, lambda: _check_image_files(load_coco_json(json_file, image_root, name), json_file)
    )
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", thing_classes=classes
    )
    logger.info("Registered COCO dataset %s: %d classes from %s", name, len(classes), json_file)


def voc_class_names(dirname, split):
    """Class names used by the objects of a VOC split, sorted, read from its XML files."""
    ids = _voc_ids(dirname, split)
    names = set()
    for fileid in ids:
        xml = os.path.join(dirname, "Annotations", fileid + ".xml")
        try:
            root = ET.parse(xml).getroot()
        except (OSError, ET.ParseError) as e:
            raise DatasetFormatError(f"cannot read VOC annotation {xml}: {e}") from None
        for obj in root.findall("object"):
            name = obj.findtext("name")
            if not name:
                raise DatasetFormatError(f"{xml}: an <object> has no <name>")
            names.add(name.strip())
    if not names:
        raise DatasetFormatError(f"VOC split {dirname} / {split} has no objects to read class names from")
    return sorted(names)


def _voc_ids(dirname, split):
    split_file = os.path.join(dirname, "ImageSets", "Main", split + ".txt")
    if not os.path.isfile(split_file):
        raise DatasetFormatError(f"VOC split file not found: {split_file}")
    with open(split_file) as f:
        return [line.strip() for line in f if line.strip()]


def _voc_flag(obj, tag, xml):
    """An object's 0/1 tag (``difficult``, ``truncated``); 0 when absent or empty (many tools write
    only ``name`` and ``bndbox``)."""
    text = obj.findtext(tag)
    if text is None or not text.strip():
        return 0
    try:
        return int(float(text))
    except ValueError:
        raise DatasetFormatError(
            f"{xml}: object '{obj.findtext('name')}' has <{tag}>{text}</{tag}>; expected 0 or 1"
        ) from None


@functools.lru_cache(maxsize=None)
def parse_voc_xml(filename):
    """The objects of a VOC annotation file as Detectron2's ``pascal_voc_evaluation.parse_rec``
    returns them (name, pose, truncated, difficult, bbox), but with ``pose``, ``truncated`` and
    ``difficult`` optional (read as "Unspecified", 0, 0, as ``load_voc_instances`` does) and
    non-integer box coordinates accepted. Cached per file, as Detectron2's."""
    from detectron2.utils.file_io import PathManager

    with PathManager.open(filename) as f:
        tree = ET.parse(f)
    objects = []
    for obj in tree.findall("object"):
        bndbox = obj.find("bndbox")
        objects.append({
            "name": (obj.findtext("name") or "").strip(),
            "pose": obj.findtext("pose") or "Unspecified",
            "truncated": _voc_flag(obj, "truncated", filename),
            "difficult": _voc_flag(obj, "difficult", filename),
            "bbox": [float(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")],
        })
    return objects


def use_lenient_voc_xml_parser():
    """Have Detectron2's ``PascalVOCDetectionEvaluator`` (the evaluator of ``evaluator_type``
    "pascal_voc" datasets) parse annotations with ``parse_voc_xml``: its own ``parse_rec`` does
    ``int(obj.find("difficult").text)`` and fails on XML without that tag (or ``pose``,
    ``truncated``). ``voc_eval`` looks ``parse_rec`` up at call time, and well-formed VOC XML
    gives the same objects, so the devkit's numbers are unchanged."""
    from detectron2.evaluation import pascal_voc_evaluation

    pascal_voc_evaluation.parse_rec = parse_voc_xml


def load_voc_instances(dirname, split, class_names):
    """Like Detectron2's VOC loader, with clear errors for unknown classes and missing files. Each
    annotation keeps its object's ``difficult`` flag (0/1, 0 when the tag is absent): the WSOD
    evaluator leaves difficult boxes out as the VOC devkit does; Detectron2's training mapper
    ignores the key (difficult objects stay training boxes, as in Detectron2's own loader)."""
    from detectron2.structures import BoxMode

    dicts = []
    for fileid in _voc_ids(dirname, split):
        xml = os.path.join(dirname, "Annotations", fileid + ".xml")
        jpeg = os.path.join(dirname, "JPEGImages", fileid + ".jpg")
        try:
            tree = ET.parse(xml).getroot()
        except (OSError, ET.ParseError) as e:
            raise DatasetFormatError(f"cannot read VOC annotation {xml}: {e}") from None
        if not os.path.isfile(jpeg):
            alt = os.path.join(dirname, "JPEGImages", fileid + ".png")
            if not os.path.isfile(alt):
                raise DatasetFormatError(f"{xml}: image {fileid} has no file {jpeg}")
            jpeg = alt
        size = tree.find("size")
        r = {
            "file_name": jpeg,
            "image_id": fileid,
            "height": int(size.findtext("height")),
            "width": int(size.findtext("width")),
        }
        instances = []
        for obj in tree.findall("object"):
            cls = obj.findtext("name").strip()
            if cls not in class_names:
                raise DatasetFormatError(
                    f"{xml}: object class '{cls}' is not in the class list {list(class_names)}"
                )
            bb = obj.find("bndbox")
            # VOC pixel indices are 1-based and inclusive: subtract 1 from x1/y1 (as Detectron2)
            try:
                box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (AttributeError, TypeError, ValueError):
                raise DatasetFormatError(f"{xml}: object '{cls}' has no valid <bndbox>") from None
            if box[2] < box[0] or box[3] < box[1]:
                raise DatasetFormatError(f"{xml}: object '{cls}' has an inverted box {box}")
            box[0] -= 1.0
            box[1] -= 1.0
            instances.append({
                "category_id": class_names.index(cls), "bbox": box, "bbox_mode": BoxMode.XYXY_ABS,
                "difficult": _voc_flag(obj, "difficult", xml),
            })
        r["annotations"] = instances
        dicts.append(r)
    return dicts


def register_voc_folder(name, dirname, split, class_names=None):
    """Register a Pascal-VOC-layout folder (Annotations/, JPEGImages/, ImageSets/Main/SPLIT.txt)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    class_names = list(class_names) if class_names else voc_class_names(dirname, split)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_voc_instances(dirname, split, class_names))
    use_lenient_voc_xml_parser()  # evaluator_type "pascal_voc": Detectron2 re-reads the XML
    MetadataCatalog.get(name).set(
        thing_classes=class_names, dirname=dirname, split=split, year=2012,
        evaluator_type="pascal_voc",
    )
    logger.info("Registered VOC dataset %s: classes %s", name, class_names)


def keep_difficult_in_builtin_voc():
    """Load Detectron2's builtin ``voc_*`` datasets (``voc_2007_trainval``, ``voc_2007_test``, ...)
    with ``load_voc_instances``: the same records, plus each object's ``difficult`` flag, which
    Detectron2's own loader drops and which the WSOD evaluation and weak tags need (the devkit
    ignores difficult objects). Metadata, folders and splits stay Detectron2's."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in [n for n in DatasetCatalog.list() if n.startswith("voc_")]:
        meta = MetadataCatalog.get(name)
        if meta.get("evaluator_type") == "pascal_voc" and meta.get("dirname"):
            DatasetCatalog.remove(name)
            DatasetCatalog.register(name, functools.partial(
                load_voc_instances, meta.dirname, meta.split, list(meta.thing_classes)))


def add_dataset_arguments(parser):
    """``--coco-dataset NAME JSON IMAGE_DIR`` / ``--voc-dataset NAME DIR SPLIT`` (repeatable) and
    ``--voc-classes`` on an argparse parser (tools/train_net.py, tools/selective_search.py)."""
    parser.add_argument(
        "--coco-dataset", nargs=3, action="append", default=[],
        metavar=("NAME", "JSON", "IMAGE_DIR"), help="register a COCO-format dataset (repeatable)",
    )
    parser.add_argument(
        "--voc-dataset", nargs=3, action="append", default=[], metavar=("NAME", "DIR", "SPLIT"),
        help="register a Pascal-VOC-layout folder split (repeatable)",
    )
    parser.add_argument(
        "--voc-classes", default=None,
        help="comma-separated VOC class names (default: read from the split's XML files)",
    )
    return parser


def register_datasets(args):
    """Register the datasets named by ``add_dataset_arguments``' options."""
    for name, json_file, image_dir in args.coco_dataset:
        register_coco_folder(name, json_file, image_dir)
    classes = args.voc_classes.split(",") if args.voc_classes else None
    for name, dirname, split in args.voc_dataset:
        register_voc_folder(name, dirname, split, classes)
