"""Data: where images come from (sources, behind one protocol), how they are split, decoded, augmented
and loaded for training.

    registry.py  data-set names -> source factories (``register_dataset``, ``list_datasets``)
    sources.py   the ``ImageSource`` protocol: random access (``IndexedSource``) or read in order
                 (``OrderedSource``); tensors and files
    builtin.py   cifar10, cifar100, digits, synthetic          folder.py  imagefolder
    shards.py    webdataset (tar shards, read in order) and ``ekdc data shard``   check.py  ``ekdc data check``
    splits.py    seeded stratified splits (``index_splits``)   decode.py  file -> uint8 tensor
    augment.py   batch augmentation and sample order          config.py  ``data:`` in a recipe
    imageset.py  in memory / streamed by position             ordered.py streamed in order
    loading.py   ``load_data``: the splits a run trains and evaluates on
    fingerprint.py  what a run's data was when it started (``--resume`` refuses data that changed)

Importing the package registers the built-in data sets.
"""
from . import builtin, folder, shards  # noqa: F401  (registration side effects)
from .augment import (
           CUTOUT_FILL,
           augment,
           augment_batch,
           augment_params,
           cutout_batch,
           epoch_order,
           iterate_batches,
           keyed_augment_params,
           param_width,
           resized_crop_batch,
)
from .config import Augment, DataConfig
from .decode import (
           CENTER_CROP,
           IMG_EXTENSIONS,
           canonical_size,
           center_crop,
           decode_files,
           decode_image,
           eval_preprocess,
)
from .imageset import Chunk, ImageSet, MemoryImages, StreamedImages
from .loading import DataSplits, load_data
from .ordered import OrderedImages, read_in_order
from .registry import (
           Sources,
           get_dataset,
           list_datasets,
           register_dataset,
           unregister_dataset,
)
from .sources import FileSource, ImageSource, IndexedSource, OrderedSource, TensorSource
from .splits import Split, SplitIndex, index_splits, stratified_split

__all__ = ["Augment", "CENTER_CROP", "CUTOUT_FILL", "Chunk", "DataConfig", "DataSplits", "FileSource", "IMG_EXTENSIONS", "ImageSet",
           "ImageSource", "IndexedSource", "MemoryImages", "OrderedImages", "OrderedSource", "Sources", "Split",
           "SplitIndex", "StreamedImages", "TensorSource", "augment", "augment_batch", "augment_params",
           "canonical_size", "center_crop", "cutout_batch", "decode_files", "decode_image", "epoch_order", "eval_preprocess",
           "get_dataset", "index_splits", "iterate_batches", "keyed_augment_params", "list_datasets", "load_data",
           "param_width", "read_in_order", "register_dataset", "resized_crop_batch", "stratified_split", "unregister_dataset"]
