"""Data: scan and select images (WikiArt, COCO, instance folder, kohya), robust I/O, transforms, latent cache."""
from customgen.data.cache import CachedLatents, LatentCache
from customgen.data.dedup import drop_near_duplicates, find_near_duplicates, hamming, image_hash
from customgen.data.io import DEFAULT_MAX_PIXELS, ImageRejected, load_image, probe_image, to_rgb
from customgen.data.kaggle import find_kaggle_roots, resolve_data_roots
from customgen.data.report import build_report, format_summary, recommend_styles, scan_report, write_report
from customgen.data.scan import LAYOUTS, ImageRecord, ScanResult, detect_layout, parse_kohya_name, scan_images
from customgen.data.select import (SELECTION_FILES, build_selection, read_selection, select_content,
                                   select_styles, write_selection)
from customgen.data.transforms import ImageDataset, build_transform

__all__ = [
    "CachedLatents", "DEFAULT_MAX_PIXELS", "ImageDataset", "ImageRecord", "ImageRejected", "LAYOUTS",
    "LatentCache", "SELECTION_FILES", "ScanResult", "build_report", "build_selection", "build_transform",
    "detect_layout", "drop_near_duplicates", "find_kaggle_roots", "find_near_duplicates", "format_summary",
    "hamming", "image_hash", "load_image", "parse_kohya_name", "probe_image", "read_selection",
    "recommend_styles", "resolve_data_roots", "scan_images", "scan_report", "select_content", "select_styles",
    "to_rgb", "write_report", "write_selection",
]
