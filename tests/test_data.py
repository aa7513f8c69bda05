"""customgen.data: robust image I/O, layouts, seeded selection, transforms, latent cache, EDA helpers."""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from customgen.data import (ImageDataset, ImageRecord, LatentCache, build_transform, find_kaggle_roots,
                            find_near_duplicates, format_summary, load_image, parse_kohya_name, read_selection,
                            recommend_styles, scan_images, scan_report, select_content, select_styles)
from customgen.data.io import ImageRejected
from customgen.errors import UserError
from tests.image_fixtures import (cmyk_jpeg, exif_rotated_jpeg, gradient_png16, make_coco_folder,
                                  make_instance_folder, make_kohya_tree, make_wikiart_tree, palette_png, rgba_png,
                                  save, textured_image, write_broken_files, write_ignored_files)


# ---------------------------------------------------------------- robust image I/O
def test_16bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.asarray(load_image(gradient_png16(tmp_path / "g16.png", width=256)))
    assert arr.shape == (8, 256, 3)
    assert arr[0, 0].tolist() == [0, 0, 0] and arr[0, -1].tolist() == [255, 255, 255]
    assert arr[0, 128, 0] == 128  # 32896·255/65535 = 128 exactly (float64 errs by ~1e-14); clipping gives 255
    assert np.all(np.diff(arr[0, :, 0].astype(int)) >= 0)


def test_rgba_is_composited_on_white(tmp_path):
    arr = np.asarray(load_image(rgba_png(tmp_path / "a.png")))
    assert arr[10, 5].tolist() == [255, 255, 255]  # transparent red → background
    assert arr[10, 50].tolist() == [0, 0, 255]


def test_palette_and_cmyk_become_rgb(tmp_path):
    assert load_image(palette_png(tmp_path / "p.png")).getpixel((3, 3)) == (0, 255, 0)
    img = load_image(cmyk_jpeg(tmp_path / "c.jpg"))
    assert img.mode == "RGB"
    # Exact: a constant 8×8 block is its DC coefficient alone, 8·(v − 128) ∈ {1016, −1024}, a multiple of the
    # quality-95 DC quantizer (2), so JPEG reproduces it exactly on every decoder.
    assert np.asarray(img)[32, 32].tolist() == [255, 0, 0]


def test_lab_and_48bit_rgb(tmp_path):
    lab = load_image(save(Image.new("LAB", (8, 8), (0, 128, 128)), tmp_path / "lab.tif"))  # L=0: black
    # littlecms' 8-bit transform interpolates a table (gives (1, 0, 1)); plain convert() would keep (0, 128, 128)
    assert max(lab.getpixel((2, 2))) <= 2
    rgb16 = np.zeros((4, 4, 3), np.uint16)
    rgb16[..., 2], rgb16[..., 1] = 65535, 32896  # OpenCV writes BGR: red full, green half
    import cv2
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16)
    assert load_image(tmp_path / "rgb16.png").getpixel((0, 0)) == (255, 128, 0)


def test_la_image_composited(tmp_path):
    la = Image.new("LA", (8, 8), (0, 0))  # black, fully transparent
    img = load_image(save(la, tmp_path / "la.png"))
    assert img.mode == "RGB" and img.getpixel((1, 1)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path):
    path = exif_rotated_jpeg(tmp_path / "rot.jpg", orientation=6)
    img = load_image(path)
    assert img.size == (40, 60)  # stored 60x40, displayed rotated 90° clockwise
    top, bottom = np.asarray(img)[5, 20].astype(int), np.asarray(img)[55, 20].astype(int)
    assert top[0] > 200 and top[2] < 50  # the stored left (red) half is on top after the rotation
    assert bottom[2] > 200 and bottom[0] < 50
    rec = scan_images(tmp_path, layout="folder", min_size=1).records[0]
    assert (rec.width, rec.height) == (40, 60)


def test_broken_files_skipped_with_reasons(tmp_path):
    make_instance_folder(tmp_path, n=3)
    expected = write_broken_files(tmp_path)
    scan = scan_images(tmp_path, layout="folder")
    got = {Path(s["path"]).name: s["reason"] for s in scan.skipped}
    assert got == expected
    assert len(scan.records) == 3
    with pytest.raises(ImageRejected, match="truncated"):
        load_image(tmp_path / "truncated.jpg")


def test_hidden_and_non_image_files_never_opened(tmp_path, monkeypatch):
    make_instance_folder(tmp_path, n=2)
    ignored = write_ignored_files(tmp_path)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(Path(fp).name) or real_open(fp, *a, **k))
    report = scan_report(tmp_path, layout="folder")
    assert sorted(opened) == ["photo_0.png", "photo_1.png"]
    assert report["n_usable"] == 2 and report["n_skipped"] == 0
    assert sorted(Path(p).name for p in report["ignored"]) == ["meta.csv", "notes.txt"]
    assert all(p.exists() for p in ignored)


def test_small_images_listed_separately_and_min_size_is_a_parameter(tmp_path):
    make_instance_folder(tmp_path, n=2, size=(256, 256))
    save(textured_image(5, (128, 96)), tmp_path / "tiny.png")
    scan = scan_images(tmp_path, layout="folder", min_size=100)
    assert [Path(r.path).name for r in scan.small] == ["tiny.png"] and len(scan.records) == 2
    report = scan_report(tmp_path, layout="folder", min_size=100)
    assert report["n_small"] == 1 and report["small"][0]["width"] == 128
    assert len(scan_images(tmp_path, layout="folder", min_size=64).records) == 3


@pytest.mark.parametrize("pil_limit", [None, 1000, 30000])
def test_decompression_bomb_refused_from_header(tmp_path, monkeypatch, pil_limit):
    path = save(textured_image(1, (200, 200)), tmp_path / "big.png")  # 40,000 pixels
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or real_load(self))
    max_pixels = 1000 if pil_limit is None else None
    if pil_limit is not None:  # PIL's own guard: 1000 → DecompressionBombError, 30000 → warning
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageRejected) as err:
            load_image(path, max_pixels=max_pixels)
        scan = scan_images(tmp_path, layout="folder", max_pixels=max_pixels)
    assert err.value.reason == "too_large" and loads == []
    assert [s["reason"] for s in scan.skipped] == ["too_large"] and scan.records == []


# ---------------------------------------------------------------- layouts
@pytest.mark.parametrize("with_csv", [True, False])
def test_wikiart_layout(tmp_path, with_csv):
    root = make_wikiart_tree(tmp_path / "wikiart" / "wikiart", with_csv=with_csv)
    scan = scan_images(tmp_path / "wikiart")  # auto-detect, one wrapping folder skipped
    assert scan.layout == "wikiart" and scan.root == root.resolve()
    assert scan.counts() == {"Impressionism": 6, "Cubism": 5, "Baroque": 4}
    assert scan.ignored == []  # classes.csv is info, not an ignored file
    assert (scan.csv["classes.csv"]["rows"] == 15) if with_csv else scan.csv == {}
    assert scan_images(root, layout="wikiart").counts() == scan.counts()


def test_coco_layout(tmp_path):
    split = make_coco_folder(tmp_path / "coco2017", n=6)
    (tmp_path / "coco2017" / "annotations").mkdir()
    for root, layout in [(tmp_path / "coco2017", None), (tmp_path / "coco2017", "coco"), (split, None)]:
        scan = scan_images(root, layout=layout)
        assert (scan.layout, scan.root, len(scan.records)) == ("coco", split.resolve(), 6)
    train = make_coco_folder(tmp_path / "only_train", n=2, split="train2017")
    assert scan_images(tmp_path / "only_train").root == train.resolve()


def test_folder_layout_writes_instance_paths(tmp_path):
    make_instance_folder(tmp_path / "dog", n=5)
    report = scan_report(tmp_path / "dog", out=tmp_path / "out")
    assert report["layout"] == "folder" and report["n_usable"] == 5
    doc = json.loads((tmp_path / "out" / "instance_paths.json").read_text())
    assert doc["kind"] == "instance" and len(doc["paths"]) == 5 and doc["items"][0]["repeats"] == 1
    assert (tmp_path / "out" / "scan_report_folder.json").is_file()


def test_kohya_layout_repeats_and_captions(tmp_path):
    make_kohya_tree(tmp_path / "train")
    (tmp_path / "train" / "not_kohya").mkdir()
    scan = scan_images(tmp_path / "train")
    assert scan.layout == "kohya" and scan.small == []  # 128-px images stay usable
    by_name = {(r.label, Path(r.path).name): r for r in scan.records}
    assert by_name[("sks person", "img_1.png")].repeats == 10
    assert by_name[("sks person", "img_1.png")].caption == "sks person"
    assert by_name[("sks person", "img_0.png")].caption == "a photo of sks person, custom caption"
    assert by_name[("ohwx dog", "img_1.png")].repeats == 2
    assert any(p.endswith("not_kohya") for p in scan.ignored)
    one = scan_images(tmp_path / "train" / "10_sks person")
    assert one.layout == "kohya" and len(one.records) == 3


def test_parse_kohya_name():
    assert parse_kohya_name("10_sks person") == (10, "sks", "person")
    assert parse_kohya_name("3_ohwx") == (3, "ohwx", None)
    assert parse_kohya_name("sks person") is None and parse_kohya_name("10_") is None


# ---------------------------------------------------------------- bad input
def test_bad_roots_are_one_line_user_errors(tmp_path):
    (tmp_path / "file.jpg").write_bytes(b"x")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("hi")
    cases = [(tmp_path / "missing", "does not exist"), (tmp_path / "file.jpg", "is a file"),
             (tmp_path / "docs", "cannot tell the layout")]
    for root, msg in cases:
        with pytest.raises(UserError, match=msg) as err:
            scan_report(root)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown layout 'flat'"):
        scan_images(tmp_path / "docs", layout="flat")
    with pytest.raises(UserError, match="no image files"):
        scan_images(tmp_path / "docs", layout="folder")


def test_unreadable_root(tmp_path, monkeypatch):
    root = tmp_path / "locked"
    root.mkdir()
    real_scandir = os.scandir

    def scandir(path="."):  # chmod 000 does not stop root (CI containers), so refuse like the OS would
        if Path(path) == root:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(UserError, match="cannot read data root .*permission denied"):
        scan_images(root)


# ---------------------------------------------------------------- selection
def test_content_selection_is_seeded(tmp_path):
    recs = [ImageRecord(path=f"/d/{i:03d}.jpg") for i in range(40)]
    a, b = select_content(recs, n=8, seed=0), select_content(list(reversed(recs)), n=8, seed=0)
    assert a == b and len(set(a)) == 8  # same seed → same picks, whatever the listing order
    assert select_content(recs, n=8, seed=1) != a
    assert len(select_content(recs, n=100, seed=0)) == 40


def test_style_selection(tmp_path):
    recs = [ImageRecord(path=f"/d/{s}/{i}.jpg", label=s) for s, n in [("A", 9), ("B", 12), ("C", 3)] for i in range(n)]
    top = select_styles(recs, n_styles=2, per_style=4, seed=0)
    assert list(top) == ["B", "A"] and all(len(v) == 4 for v in top.values())
    named = select_styles(recs, styles=["A", "C"], per_style=4, seed=0)
    assert named["A"] == top["A"] and len(named["C"]) == 3  # per-style seeds: A unchanged
    assert select_styles(recs, n_styles=2, per_style=4, seed=1) != top
    with pytest.raises(UserError, match="did you mean A"):
        select_styles(recs, styles=["a"], seed=0)


def test_scan_report_writes_selection_and_refuses_overwrite(tmp_path):
    make_wikiart_tree(tmp_path / "w")
    out = tmp_path / "out"
    report = scan_report(tmp_path / "w", out=out, seed=3, n_styles=2, per_style=3)
    doc = json.loads((out / "style_paths.json").read_text())
    assert (doc["kind"], doc["seed"], doc["layout"]) == ("style", 3, "wikiart")
    assert {k: len(v) for k, v in doc["styles"].items()} == {"Impressionism": 3, "Cubism": 3}
    assert report["selection"]["styles"] == {"Impressionism": 3, "Cubism": 3}
    saved = json.loads((out / "scan_report_wikiart.json").read_text())
    assert saved["counts"] == report["counts"] and saved["sizes"]["width"]["median"] == 320
    before = (out / "style_paths.json").read_text()
    with pytest.raises(UserError, match=r"style_paths.json already exists; pass --overwrite"):
        scan_report(tmp_path / "w", out=out, seed=4, n_styles=2, per_style=3)
    assert (out / "style_paths.json").read_text() == before
    scan_report(tmp_path / "w", out=out, seed=4, n_styles=2, per_style=3, overwrite=True)
    assert json.loads((out / "style_paths.json").read_text())["seed"] == 4


def test_content_paths_json_and_reroot(tmp_path):
    make_coco_folder(tmp_path / "coco", n=10)
    scan_report(tmp_path / "coco", out=tmp_path / "out", n_content=4, seed=0)
    doc = json.loads((tmp_path / "out" / "content_paths.json").read_text())
    assert (doc["kind"], doc["n_requested"], doc["n_available"], len(doc["paths"])) == ("content", 4, 10, 4)
    shutil.move(tmp_path / "coco", tmp_path / "moved")
    with pytest.raises(UserError, match="missing"):
        read_selection(tmp_path / "out" / "content_paths.json")
    moved = read_selection(tmp_path / "out" / "content_paths.json", root=tmp_path / "moved" / "val2017")
    assert all(p.is_file() and "moved" in str(p) for p in moved["paths"])


def test_format_summary_and_sizes(tmp_path):
    make_wikiart_tree(tmp_path, styles={"A": 2, "B": 1}, size=(300, 260))
    save(textured_image(1, (120, 100)), tmp_path / "B" / "small.jpg")
    report = scan_report(tmp_path)
    assert report["sizes"]["width"] == {"min": 120, "median": 300.0, "max": 300}
    text = format_summary(report)
    assert "usable 3; small (< 256 px) 1; skipped 0" in text and "A 2, B 1" in text


# ---------------------------------------------------------------- transforms, dataset, latent cache
def _two_tone(path: Path, size=(96, 64)) -> Path:
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:, size[0] // 2:] = 255  # left black, right white
    return save(Image.fromarray(arr), path)


def test_transform_shape_range_and_crop(tmp_path):
    img = load_image(_two_tone(tmp_path / "t.png"))
    x = build_transform(resolution=32, center_crop=True)(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert x[:, :, :8].max() < -0.9 and x[:, :, -8:].min() > 0.9  # center crop keeps black left, white right


def test_random_flip_mirrors(tmp_path):
    img = load_image(_two_tone(tmp_path / "t.png", size=(64, 64)))
    plain = build_transform(resolution=32)(img)
    flip = build_transform(resolution=32, random_flip=True)
    outs = [flip(img) for _ in range(20)]
    kinds = {"plain" if torch.equal(o, plain) else "flip" if torch.equal(o, plain.flip(-1)) else "other" for o in outs}
    assert kinds == {"plain", "flip"}


def test_dataset_honours_repeats_and_captions(tmp_path):
    make_kohya_tree(tmp_path)
    ds = ImageDataset(scan_images(tmp_path).records, resolution=64)
    assert len(ds) == 2 * 2 + 3 * 10
    items = [ds[i] for i in range(len(ds))]
    assert items[0]["pixel_values"].shape == (3, 64, 64)
    assert sum(it["caption"] == "sks person" for it in items) == 2 * 10
    assert {it["index"] for it in items} == set(range(5))
    plain = ImageDataset([tmp_path / "2_ohwx dog" / "img_1.png"], resolution=32, caption="a photo of ohwx dog")
    assert len(plain) == 1 and plain[0]["caption"] == "a photo of ohwx dog"


def _tiny_vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()


def test_latent_cache_encodes_once_and_persists(tmp_path):
    make_instance_folder(tmp_path / "img", n=3, size=(80, 72))
    ds = ImageDataset(scan_images(tmp_path / "img").records, resolution=32)
    vae, calls = _tiny_vae(), []
    vae.encoder.register_forward_hook(lambda *_: calls.append(1))
    cache = LatentCache(vae, cache_dir=tmp_path / "cache", batch_size=2)
    first = cache.get(ds)
    assert first.mean.shape == (3, 4, 16, 16) and len(calls) == 2 and cache.encoded == 3
    with torch.no_grad():  # images 0 and 1 went through the encoder together (batch_size=2): the same call
        ref = vae.encode(torch.stack([ds[0]["pixel_values"], ds[1]["pixel_values"]])).latent_dist
    calls.clear()
    assert torch.equal(first.mean[:2], ref.mean * vae.config.scaling_factor)
    assert torch.equal(first.std[:2], ref.std * vae.config.scaling_factor)
    assert torch.equal(cache.get(ds).mean, first.mean) and calls == []
    again = LatentCache(vae, cache_dir=tmp_path / "cache").get(ds)
    assert torch.equal(again.std, first.std) and calls == []  # disk cache survives a new instance
    os.utime(ds.records[0].path, ns=(1, 1))  # mtime changed → that image only is re-encoded
    LatentCache(vae, cache_dir=tmp_path / "cache").get(ds)
    assert len(calls) == 1
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    assert torch.equal(first.sample([0, 2], generator=g()), first.sample([0, 2], generator=g()))
    assert not torch.equal(first.sample([0, 2], generator=g()), first.mean[[0, 2]])


def test_latent_cache_refuses_random_augmentation(tmp_path):
    make_instance_folder(tmp_path, n=1, size=(64, 64))
    ds = ImageDataset(scan_images(tmp_path).records, resolution=32, random_flip=True)
    with pytest.raises(UserError, match="random_flip=False"):
        LatentCache(_tiny_vae()).get(ds)


# ---------------------------------------------------------------- EDA helpers
def test_near_duplicates(tmp_path):
    make_instance_folder(tmp_path, n=3, size=(200, 160))
    Image.open(tmp_path / "photo_0.png").convert("RGB").save(tmp_path / "copy.jpg", quality=40)
    Image.open(tmp_path / "photo_0.png").resize((150, 120)).save(tmp_path / "small_copy.png")
    paths = sorted(str(p) for p in tmp_path.iterdir())
    groups = find_near_duplicates(paths, threshold=6)
    assert [[Path(p).name for p in g] for g in groups] == [["copy.jpg", "photo_0.png", "small_copy.png"]]
    assert find_near_duplicates(scan_images(tmp_path).records, threshold=6) == groups  # stored hashes agree


def test_recommend_styles():
    report = {"counts": {"Baroque": 55, "Cubism": 10, "Abstract": 55, "Pop": 80}}
    rec = recommend_styles(report, min_images=50, k=5)
    assert rec["styles"] == ["Pop", "Abstract", "Baroque"] and rec["n_qualified"] == 3
    assert "only 3 of 4 styles" in rec["reason"]
    assert recommend_styles(report, min_images=50, k=2)["styles"] == ["Pop", "Abstract"]
    none = recommend_styles(report, min_images=100)
    assert none["styles"] == [] and "largest: Pop with 80" in none["reason"]


def test_find_kaggle_roots(tmp_path):
    styles = {s: 1 for s in ["A", "B", "C", "D", "E", "F"]}
    wiki = make_wikiart_tree(tmp_path / "wikiart" / "wikiart", styles=styles, size=(32, 32))
    make_coco_folder(tmp_path / "coco-2017" / "coco2017", n=1, split="train2017", size=(32, 32))
    val = make_coco_folder(tmp_path / "coco-2017" / "coco2017", n=1, split="val2017", size=(32, 32))
    make_kohya_tree(tmp_path / "subject")
    assert find_kaggle_roots(tmp_path) == {"wikiart": wiki, "coco": val}
    assert find_kaggle_roots(tmp_path / "subject") == {"wikiart": None, "coco": None}
    assert find_kaggle_roots(tmp_path / "nowhere") == {"wikiart": None, "coco": None}


# ---------------------------------------------------------------- CLI wiring
def test_cli_data_scan(tmp_path, capsys):
    import subprocess
    import sys

    from customgen.cli import main

    make_coco_folder(tmp_path / "coco", n=5)
    broken = write_broken_files(tmp_path / "coco" / "val2017")
    cmd = [sys.executable, "-m", "customgen", "data", "scan", str(tmp_path / "coco"), "--out", str(tmp_path / "o")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "coco layout" in done.stdout and "usable 5" in done.stdout
    for name, reason in broken.items():  # every broken file is listed with its reason
        assert f"{name}: {reason}" in done.stdout
    assert len(json.loads((tmp_path / "o" / "content_paths.json").read_text())["paths"]) == 5
    assert main(["data", "scan", str(tmp_path / "coco"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "content_paths.json already exists; pass --overwrite" in err
    assert main(["data", "scan", str(tmp_path / "nope")]) == 2
