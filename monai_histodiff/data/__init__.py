"""Data layer every stage reads through: datalists, stratified splits, unlabeled sources, tile transforms,
input validation, downloads and the toy tiles of the demo."""

from __future__ import annotations

from monai_histodiff.data.datalist import (
    GROUPS_FILENAME,
    IMAGE_EXTENSIONS,
    attach_groups,
    class_counts,
    find_groups_file,
    group_duplicate_files,
    items_digest,
    list_images,
    load_datalist,
    read_groups_file,
    read_labeled_list,
    save_class_map,
    scan_class_folders,
    write_datalist,
)
from monai_histodiff.data.atomic import atomic_write
from monai_histodiff.data.download import DATASETS, download_dataset
from monai_histodiff.data.manifest import (
    MANIFEST_FIELDS,
    MERGED_MANIFEST,
    read_generation_manifest,
    read_manifest,
    tile_filename,
)
from monai_histodiff.data.prepare import ensure_split, load_labeled, prepare_labeled_split, prepare_unlabeled
from monai_histodiff.data.split import check_groups_disjoint, make_split, stratified_sample, write_split
from monai_histodiff.data.toy import TOY_CLASSES, TOY_NOTICE, make_toy_dataset, render_toy_tile
from monai_histodiff.data.transforms import ToRGBd, pil_to_rgb, tile_reader, tile_transforms, to_uint8_image
from monai_histodiff.data.unlabeled import format_source_counts, source_counts, sources_in, unlabeled_datalist
from monai_histodiff.data.validation import (
    BadFilesError,
    CorruptFileError,
    check_class_images,
    check_image,
    scan_images,
)

__all__ = [
    "GROUPS_FILENAME",
    "IMAGE_EXTENSIONS",
    "attach_groups",
    "class_counts",
    "find_groups_file",
    "group_duplicate_files",
    "items_digest",
    "list_images",
    "load_datalist",
    "read_groups_file",
    "read_labeled_list",
    "save_class_map",
    "scan_class_folders",
    "write_datalist",
    "atomic_write",
    "DATASETS",
    "download_dataset",
    "MANIFEST_FIELDS",
    "MERGED_MANIFEST",
    "read_generation_manifest",
    "read_manifest",
    "tile_filename",
    "ensure_split",
    "load_labeled",
    "prepare_labeled_split",
    "prepare_unlabeled",
    "check_groups_disjoint",
    "make_split",
    "stratified_sample",
    "write_split",
    "TOY_CLASSES",
    "TOY_NOTICE",
    "make_toy_dataset",
    "render_toy_tile",
    "ToRGBd",
    "pil_to_rgb",
    "tile_reader",
    "tile_transforms",
    "to_uint8_image",
    "format_source_counts",
    "source_counts",
    "sources_in",
    "unlabeled_datalist",
    "BadFilesError",
    "CorruptFileError",
    "check_class_images",
    "check_image",
    "scan_images",
]
