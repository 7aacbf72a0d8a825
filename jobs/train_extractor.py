"""Train (or find in the cache) the offline feature extractor of a dataset: the classifier behind
``jobs.evaluate --protocol cnn`` and its ``fid_<dataset>_cnn`` numbers.

    python -m jobs.train_extractor --dataset fmnist
    python -m jobs.train_extractor --dataset parquet_images --path /abs/my_images.parquet

``jobs.evaluate`` trains it on first use anyway; running this first keeps that time out of an
evaluation and reports the classifier's test accuracy. Prints JSON: the cached file, its sha256
(reported with every ``*_cnn`` metric), whether it was already cached, the test accuracy.
Exit status 2 for bad input (unknown dataset, missing files).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from jobs.evaluate import _positive
from service.config import ConfigError, DataConfig
from service.images import IMAGE_DATASETS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=IMAGE_DATASETS, help="image dataset")
    p.add_argument("--path", help="parquet_images: the Parquet file (test split: --test-path, default the same)")
    p.add_argument("--test-path", help="parquet_images: Parquet file of the test split")
    p.add_argument("--root", help="folder of the dataset files (default $INTROPRIOR_DATA / Debian FMNIST)")
    p.add_argument("--train-images", type=_positive, help="train on the first N training images (default: all)")
    p.add_argument("--cache-dir", help="default $INTROPRIOR_CACHE_DIR or ~/.cache/introprior/extractors")
    args = p.parse_args(argv)

    from service.feature_extractor import cnn_accuracy, load_or_train_cnn
    from service.images import make_image_source

    t0 = time.perf_counter()
    try:
        data = DataConfig(dataset=args.dataset, path=args.path, test_path=args.test_path, root=args.root)
        train, test = make_image_source(data, "train"), make_image_source(data, "test")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    images = train.images[:args.train_images] if args.train_images else train.images
    dataset = args.dataset if args.dataset != "parquet_images" else train.name
    try:
        model, info = load_or_train_cnn(dataset, images, train.labels[:len(images)], cache_dir=args.cache_dir,
                                        log=lambda s: print(s, file=sys.stderr, flush=True))
    except ValueError as e:  # e.g. unlabelled images
        print(f"error: {e}", file=sys.stderr)
        return 2
    info["test_accuracy"] = cnn_accuracy(model, test.images, test.labels)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
