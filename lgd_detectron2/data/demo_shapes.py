"""Built-in demo data: a deterministic synthetic detection dataset of drawn shapes.

Three classes (circle, square, triangle) in random colours, sizes from small (12 px) to large
(96 px) on 192x192 images, with overlaps (smaller shapes partly occlude larger ones), a minimum colour contrast to the background, on textured
backgrounds (colour gradients, stripes, blotches and pixel noise). Written once as PNG images plus
COCO-format JSON into a cache folder, then registered with Detectron2's catalogs as
``demo_shapes_train``, ``demo_shapes_val`` and ``demo_shapes_select`` (a second held-out split,
for choosing designs without touching the reported one).

Difficulty knobs chosen so that a from-scratch detector learns it on CPU in minutes but AP is not
trivially 100: small objects, occlusion, colour carries no class information, noisy background.
"""
import hashlib
import json
import logging
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

CLASSES = ("circle", "square", "triangle")
VERSION = 5  # bump when the generator changes: the cache folder name includes it
IMAGE_SIZE = 192
# split -> (num_images, seed). "select": for choosing designs (the blur protocol's ablations), so
# that the split a table reports (val) is not the one its design was chosen on
SPLITS = {"train": (1200, 20260101), "val": (150, 20260202), "select": (150, 20260404)}
MIN_SIZE, MAX_SIZE = 12, 96
MAX_OBJECTS = 5
MIN_CONTRAST = 60  # mean |shape colour - background colour| over RGB at the shape's centre


def default_root():
    """Cache folder: $LGD_DEMO_DATA if set, else ~/.cache/lgd_detectron2."""
    base = os.environ.get("LGD_DEMO_DATA") or os.path.join(
        os.path.expanduser("~"), ".cache", "lgd_detectron2"
    )
    return os.path.join(base, f"demo_shapes_v{VERSION}")


def _background(rng, size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(40, 215, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3.0
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    kind = rng.integers(3)
    if kind == 0:  # stripes
        period = rng.uniform(6, 24)
        phase = rng.uniform(0, 2 * np.pi)
        stripes = np.sin((xx * np.cos(angle + 1) + yy * np.sin(angle + 1)) * size / period + phase)
        img += rng.uniform(10, 30) * stripes[..., None]
    elif kind == 1:  # soft blotches
        for _ in range(rng.integers(3, 8)):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
            img += rng.uniform(-50, 50, size=3)[None, None, :] * blob[..., None]
    img += rng.normal(0, rng.uniform(3, 10), size=img.shape)
    return img


def _draw_shape(draw, cls, cx, cy, s, angle, color):
    """Draw one shape of size ``s`` centred at (cx, cy); return its tight xyxy box and its outline
    as a polygon (a circle as 32 points on it)."""
    r = s / 2.0
    if cls == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        a = np.arange(32) * 2 * np.pi / 32
        return (cx - r, cy - r, cx + r, cy + r), list(zip(cx + r * np.cos(a), cy + r * np.sin(a)))
    if cls == "square":  # side s, rotated by angle: vertices on a circle of radius r*sqrt(2)
        angles, radius = angle + np.pi / 4 + np.arange(4) * np.pi / 2, r * np.sqrt(2)
    else:  # equilateral triangle, apex up (angle 0), inscribed in a circle of radius r
        angles, radius = angle - np.pi / 2 + np.arange(3) * 2 * np.pi / 3, r
    pts = [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles]
    draw.polygon(pts, fill=color)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (min(xs), min(ys), max(xs), max(ys)), pts


def _make_image(rng, size):
    img = _background(rng, size)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    specs = []
    for _ in range(rng.integers(1, MAX_OBJECTS + 1)):
        cls_id = int(rng.integers(len(CLASSES)))
        # log-uniform size: as many small objects as large ones
        s = float(np.exp(rng.uniform(np.log(MIN_SIZE), np.log(MAX_SIZE))))
        cx, cy = rng.uniform(s / 2, size - s / 2, size=2)
        bg = img[int(cy), int(cx)]
        color = rng.integers(0, 256, size=3)
        while np.abs(color - bg).mean() < MIN_CONTRAST:
            color = rng.integers(0, 256, size=3)
        color = tuple(int(c) for c in color)
        # small rotation jitter only: upright squares and triangles stay distinguishable from
        # circles in a 7x7 RoI feature, which a from-scratch CPU model can learn in minutes
        specs.append((s, cls_id, cx, cy, rng.uniform(-0.2, 0.2), color))
    # Largest first, so a shape can be partly occluded by a smaller one but never hidden by it.
    specs.sort(key=lambda spec: -spec[0])
    annos = []
    for s, cls_id, cx, cy, angle, color in specs:
        (x0, y0, x1, y1), outline = _draw_shape(draw, CLASSES[cls_id], cx, cy, s, angle, color)
        x0, y0 = max(0.0, x0), max(0.0, y0)
        x1, y1 = min(float(size), x1), min(float(size), y1)
        polygon = [round(float(np.clip(v, 0, size)), 2) for point in outline for v in point]
        annos.append((cls_id, [x0, y0, x1 - x0, y1 - y0], polygon))
    pixels = np.asarray(canvas).astype(np.float32)
    pixels += rng.normal(0, 3, size=pixels.shape)  # sensor noise over the shapes too
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), annos


def generate_split(out_dir, split, num_images, seed, size=IMAGE_SIZE):
    """Write ``out_dir/<split>/*.png`` and ``out_dir/<split>.json``; returns the JSON path."""
    rng = np.random.default_rng(seed)
    img_dir = os.path.join(out_dir, split)
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        img, annos = _make_image(rng, size)
        file_name = f"{image_id:05d}.png"
        img.save(os.path.join(img_dir, file_name))
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for cls_id, (x, y, w, h), polygon in annos:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cls_id + 1,
                    "bbox": [round(v, 2) for v in (x, y, w, h)],
                    # amodal outline: the part a smaller shape occludes is included
                    "segmentation": [polygon],
                    "area": round(w * h, 2),
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": f"lgd_detectron2 demo shapes v{VERSION}, {split}, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)],
    }
    json_path = os.path.join(out_dir, f"{split}.json")
    with open(json_path, "w") as f:
        json.dump(coco, f)
    return json_path


def ensure_demo_data(root=None, splits=None):
    """Generate the demo data once (atomically) and return ``{split: (json, image_dir)}``."""
    root = root or default_root()
    splits = splits or SPLITS
    done_marker = os.path.join(root, "DONE")
    if not os.path.exists(done_marker):
        parent = os.path.dirname(os.path.abspath(root))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".demo_shapes_tmp", dir=parent)
        logger.info("Generating the built-in demo data into %s", root)
        for split, (num, seed) in splits.items():
            generate_split(tmp, split, num, seed)
        with open(os.path.join(tmp, "DONE"), "w") as f:
            f.write("ok\n")
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.exists(done_marker):
                raise
    return {s: (os.path.join(root, f"{s}.json"), os.path.join(root, s)) for s in splits}


def dataset_digest(root=None):
    """SHA-256 over every file of the generated data (for determinism checks)."""
    root = root or default_root()
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def register_demo_shapes():
    """Register ``demo_shapes_<split>`` for each of SPLITS (data generated lazily on first use)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    for split in SPLITS:
        name = f"demo_shapes_{split}"
        if name in DatasetCatalog.list():
            continue
        root = default_root()

        def load(split=split, name=name):
            json_file, image_dir = ensure_demo_data()[split]
            return load_coco_json(json_file, image_dir, name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            json_file=os.path.join(root, f"{split}.json"),
            image_root=os.path.join(root, split),
            evaluator_type="coco",
            thing_classes=list(CLASSES),
        )


# ---------------- object-centric classification images (the demo's "ImageNet") ----------------
# Weakly supervised detectors start from a classification-pretrained body (ImageNet for VOC).
# demo_shapes_objects plays that part for the built-in data: one shape per 64x64 image, labelled
# by its class only, drawn from separate seeds (no image or box of demo_shapes_train is used).
OBJECT_SPLIT = ("objects", 8000, 20260303)  # name, images, seed
OBJECT_IMAGE_SIZE = 64
OBJECT_SIZES = (16, 56)


def _make_object_image(rng, size=OBJECT_IMAGE_SIZE):
    img = _background(rng, size)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    cls_id = int(rng.integers(len(CLASSES)))
    s = float(np.exp(rng.uniform(*np.log(OBJECT_SIZES))))
    cx, cy = rng.uniform(s / 2, size - s / 2, size=2)
    color = rng.integers(0, 256, size=3)
    while np.abs(color - img[int(cy), int(cx)]).mean() < MIN_CONTRAST:
        color = rng.integers(0, 256, size=3)
    _draw_shape(ImageDraw.Draw(canvas), CLASSES[cls_id], cx, cy, s, rng.uniform(-0.2, 0.2),
                tuple(int(c) for c in color))
    pixels = np.asarray(canvas).astype(np.float32) + rng.normal(0, 3, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), cls_id


def ensure_object_data(root=None):
    """Generate the object-centric images once (atomically); returns the labels JSON path."""
    root = root or default_root() + "_objects"
    labels_file = os.path.join(root, "labels.json")
    if os.path.exists(labels_file):
        return labels_file
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo_objects_tmp", dir=parent)
    _, num, seed = OBJECT_SPLIT
    rng = np.random.default_rng(seed)
    labels = []
    for image_id in range(1, num + 1):
        img, cls_id = _make_object_image(rng)
        img.save(os.path.join(tmp, f"{image_id:05d}.png"))
        labels.append([image_id, cls_id])
    with open(os.path.join(tmp, "labels.json"), "w") as f:
        json.dump({"classes": list(CLASSES), "labels": labels}, f)
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return labels_file


def register_demo_objects():
    """Register ``demo_shapes_objects``: records with ``image_labels`` (one class) and no boxes."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = "demo_shapes_" + OBJECT_SPLIT[0]
    if name in DatasetCatalog.list():
        return

    def load():
        labels_file = ensure_object_data()
        with open(labels_file) as f:
            labels = json.load(f)["labels"]
        folder, size = os.path.dirname(labels_file), OBJECT_IMAGE_SIZE
        return [{"file_name": os.path.join(folder, f"{i:05d}.png"), "image_id": i, "height": size,
                 "width": size, "image_labels": [c]} for i, c in labels]

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(thing_classes=list(CLASSES))
