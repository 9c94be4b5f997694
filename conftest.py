"""Fixtures shared by test_utils.py and test_smoke.py: tiny data sets written in the real on-disk layouts.

`fake_cifar10_dir`, `fake_cifar100_dir`, `fake_tinyimagenet_dir` (session-scoped) write tiny data sets in the layouts
torchvision downloads and return the data folder (--data-dir) that holds them. `CreatesFileWhenUnpickled` is the
pickled object the checkpoint tests plant in a checkpoint.
"""
import os
import pickle

import numpy as np
import pytest

REPO = os.path.dirname(os.path.abspath(__file__))

FAKE_CIFAR_PER_BATCH, FAKE_CIFAR_TEST = 8, 12  # CIFAR-10: 5 batches of 8 = 40 train images; CIFAR-100: one file of 40
FAKE_TINY_WNIDS = ("n01443537", "n01629819", "n01641577")  # 3 classes (the real set has 200)
FAKE_TINY_COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))  # class k's training images are solid colour k
FAKE_TINY_TRAIN, FAKE_TINY_VAL_LABELS = 4, (2, 0, 1, 1, 2, 0)  # train images per class; val labels in file order
# real CIFAR-10 beside the checkout, where this project's developers keep it (optional: one test uses it if present)
SHARED_DATA = os.path.join(REPO, "..", "shared", "data")


def channel_planes_image():
    """A 32×32 RGB image (H×W×3) whose planes differ: R = 8·row, G = 8·column, B = 77."""
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    return np.stack([8 * rows, 8 * cols, np.full((32, 32), 77)], axis=-1).astype(np.uint8)


def cifar_rows(images_hwc):
    """Encode H×W×3 images as CIFAR rows: the R plane, then G, then B, each 32×32 row-major (torchvision's layout)."""
    return np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), 3072))


def write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def read_pickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


class CreatesFileWhenUnpickled:
    """A pickled object whose unpickling calls open(marker, "w"): a harmless stand-in for the code that a malicious
    checkpoint would run under torch.load(weights_only=False). The file `marker` appearing means the code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="session")
def fake_cifar10_dir(tmp_path_factory):
    """--data-dir holding cifar-10-batches-py/: data_batch_1..5 (8 images each), test_batch (12), batches.meta.
    Training image 0 is channel_planes_image(); labels are plain int lists, as in the real pickles."""
    root = tmp_path_factory.mktemp("cifar10_data")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(10)
    for k in range(1, 6):
        images = rng.integers(0, 256, (FAKE_CIFAR_PER_BATCH, 32, 32, 3), dtype=np.uint8)
        if k == 1:
            images[0] = channel_planes_image()
        labels = [int(v) for v in rng.integers(0, 10, FAKE_CIFAR_PER_BATCH)]
        write_pickle(folder / f"data_batch_{k}", {"batch_label": f"training batch {k} of 5", "labels": labels,
                                                  "data": cifar_rows(images), "filenames": [""] * len(labels)})
    test_images = rng.integers(0, 256, (FAKE_CIFAR_TEST, 32, 32, 3), dtype=np.uint8)
    write_pickle(folder / "test_batch", {"labels": [k % 10 for k in range(FAKE_CIFAR_TEST)],
                                         "data": cifar_rows(test_images)})
    write_pickle(folder / "batches.meta", {"label_names": [f"class{k}" for k in range(10)], "num_vis": 3072,
                                           "num_cases_per_batch": FAKE_CIFAR_PER_BATCH})
    return str(root)


@pytest.fixture(scope="session")
def fake_cifar100_dir(tmp_path_factory):
    """--data-dir holding cifar-100-python/: train (40 images), test (12), meta; fine and coarse labels."""
    root = tmp_path_factory.mktemp("cifar100_data")
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(100)
    for split, n in (("train", 5 * FAKE_CIFAR_PER_BATCH), ("test", FAKE_CIFAR_TEST)):
        fine = [int(v) for v in rng.integers(0, 100, n)]
        fine[0] = 99  # the largest label must be accepted
        write_pickle(folder / split, {"fine_labels": fine, "coarse_labels": [v // 5 for v in fine],
                                      "data": cifar_rows(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))})
    write_pickle(folder / "meta", {"fine_label_names": [f"fine{k}" for k in range(100)],
                                   "coarse_label_names": [f"coarse{k}" for k in range(20)]})
    return str(root)


@pytest.fixture(scope="session")
def fake_tinyimagenet_dir(tmp_path_factory):
    """--data-dir holding tiny-imagenet-200/ with 3 classes (wnids.txt), 4 solid-colour 64×64 training JPEGs per class
    (class 1's last one greyscale, value 128), 6 val JPEGs labelled by val/val_annotations.txt (one greyscale)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tinyimagenet_data")
    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("".join(w + "\n" for w in FAKE_TINY_WNIDS))
    for k, wnid in enumerate(FAKE_TINY_WNIDS):
        (folder / "train" / wnid / "images").mkdir(parents=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")  # present in the real set; not an image
        for j in range(FAKE_TINY_TRAIN):
            image = Image.new("RGB", (64, 64), FAKE_TINY_COLOURS[k])
            if k == 1 and j == FAKE_TINY_TRAIN - 1:
                image = Image.new("L", (64, 64), 128)
            image.save(folder / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", quality=95)
    lines = []
    for i, label in enumerate(FAKE_TINY_VAL_LABELS):
        image = Image.new("L", (64, 64), 60) if i == 0 else Image.new("RGB", (64, 64), FAKE_TINY_COLOURS[label])
        image.save(folder / "val" / "images" / f"val_{i}.JPEG", quality=95)
        lines.append(f"val_{i}.JPEG\t{FAKE_TINY_WNIDS[label]}\t0\t0\t63\t63\n")
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    return str(root)
