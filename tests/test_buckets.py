"""Aspect-ratio buckets and kohya's caption options (issue 28): kohya's bucket table and assignment, the crop, bad
settings, `customgen data scan --buckets`, one shape per micro-batch, exact resume, the latent cache per bucket,
caption dropout and shuffle, the plan for a non-square bucket, style.json's bucket table."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from customgen import kinds
from customgen.cli import main
from customgen.config import find_config, load_config
from customgen.data import ImageDataset, ImageRecord, LatentCache, load_image, scan_images
from customgen.data.buckets import Placement, bucket_spec
from customgen.data.captions import CaptionRules
from customgen.data.transforms import bucket_pixels
from customgen.errors import Notice, UserError
from customgen.kinds import lora
from customgen.memory import MemoryPlan
from customgen.train import build_run, train
from customgen.train import loop
from customgen.train.captions import read_captions
from customgen.train.data import ImageSet, settle_data
from customgen.train.estimate import estimate_training
from tests.image_fixtures import save, textured_image
from tests.interrupt import killed_at

ROOT = Path(__file__).resolve().parents[1]

# kohya-ss/sd-scripts@48d368f make_bucket_resolutions((512, 512), 256, 1024, 64), worked out by hand: the square
# 512×512, then for each width w = 256, 320, ..., 1024 the height min(1024, (512² // w) // 64 · 64) and its transpose:
# 256→1024, 320→768 (819 → 768), 384→640 (682), 448→576 (585), 512→512, 576→448, 640→384, 704→320 (372),
# 768→320 (341), 832→256 (315), 896→256 (292), 960→256 (273), 1024→256; as a sorted set.
TABLE_512 = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
             (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
             (1024, 256)]
# The same at 128 px, min 64: 128×128; w = 64 → 256, 128 → 128, 192 → 64 (85), 256 → 64; 320 → 0 (< 64, none).
TABLE_128 = [(64, 192), (64, 256), (128, 128), (192, 64), (256, 64)]

# (resolution, min_bucket, no_upscale, image size) → (bucket, size it is resized to before the crop), kohya's
# BucketManager.select_bucket. Predefined: the table's bucket with the smallest |w/h − ratio| (the first on a tie, as
# np.argmin), scaled so the image covers it, each side int(x·scale + 0.5). No upscale: the image's own size, shrunk to
# ≤ res² pixels when larger (round the width or the height to the step, keep whichever keeps the ratio closer), then
# rounded down to the step.
KOHYA = [
    (512, 256, False, (1000, 1000), (512, 512), (512, 512)),  # square
    (512, 256, False, (800, 600), (576, 448), (597, 448)),  # 4:3: 576/448 = 1.286 (error .048); 448/600 · 800 = 597.3
    (512, 256, False, (600, 800), (448, 576), (448, 597)),  # 3:4
    (512, 256, False, (1920, 1080), (640, 384), (683, 384)),  # 16:9: 640/384 = 1.667 (.111) vs 704/320 = 2.2 (.422)
    (512, 256, False, (1080, 1920), (384, 640), (384, 683)),  # 9:16
    (512, 256, False, (300, 900), (256, 832), (277, 832)),  # 1:3: 256/832 = .308 (.026) vs 256/896 = .286 (.048)
    (512, 256, False, (40, 30), (576, 448), (597, 448)),  # tiny: upscaled ×14.9 to cover 576×448
    (512, 256, False, (8000, 6000), (576, 448), (597, 448)),  # huge
    (512, 256, False, (704, 320), (704, 320), (704, 320)),  # a bucket's own size
    (128, 64, False, (200, 100), (128, 128), (256, 128)),  # 2:1 ties: |1 − 2| = |3 − 2|; 128×128 comes first
    (128, 64, False, (100, 200), (64, 192), (96, 192)),  # 1:2: 64/192 = .333 (.167) vs 64/256 = .25 (.25)
    (128, 64, False, (300, 100), (192, 64), (192, 64)),  # 3:1 exactly: 192×64
    (512, 256, True, (400, 300), (384, 256), (400, 300)),  # no upscale, within 512²: its size rounded down
    (512, 256, True, (2000, 1500), (512, 384), (512, 384)),  # shrunk: width 591.2 → 576 (576/384 = 1.5) vs height
    #                                                         443.4 → 384, 384 · 4/3 = 512 (ratio kept): 512×384
    (512, 256, True, (300, 900), (256, 768), (256, 768)),  # 270,000 > 512² pixels: 295.6 → 256, 768
    (512, 256, True, (1920, 1080), (640, 384), (683, 384)),
]


@pytest.mark.parametrize("res, low", [(512, 256), (128, 64)])
def test_the_bucket_table_is_kohyas(res, low):
    spec = bucket_spec(res, min_bucket=low, max_bucket=1024, step=64)
    assert spec.table == {512: TABLE_512, 128: TABLE_128}[res]
    assert all(w * h <= res * res and w % 64 == h % 64 == 0 for w, h in spec.table)
    assert spec.largest() == (res, res)  # the most pixels; the square wins the tie with 256×1024 (512²)


@pytest.mark.parametrize("res, low, no_upscale, size, bucket, resized", KOHYA)
def test_each_image_goes_to_kohyas_bucket(res, low, no_upscale, size, bucket, resized):
    spec = bucket_spec(res, min_bucket=low, max_bucket=1024, step=64, no_upscale=no_upscale)
    assert spec.place(*size) == Placement(bucket, resized)


def test_no_upscale_skips_a_side_below_the_step_and_ignores_the_table():
    spec = bucket_spec(512, no_upscale=True)
    assert spec.place(50, 300) is None and spec.place(40, 30) is None  # 50 → 0, 40 → 0: small (kohya divides by 0)
    assert spec.place(64, 300) == Placement((64, 256), (64, 300))  # not in the table: its own size
    assert spec.largest() == (512, 512)


def test_resize_covers_the_bucket_and_crops_centred_or_seeded():
    """A 597×448 image is already its 4:3 resize (scale 1): the crop is columns 10..585 (kohya's excess // 2) centred,
    and a seeded offset in 0..21 otherwise."""
    arr = (np.arange(597)[None, :, None] % 256).repeat(448, 0).repeat(3, 2).astype(np.uint8)
    from PIL import Image

    image = Image.fromarray(arr)
    place = bucket_spec(512).place(597, 448)
    assert place == Placement((576, 448), (597, 448)) and place.crop_box() == (10, 0)
    x = bucket_pixels(image, place)  # (3, 448, 576) in [-1, 1]: back to the 8-bit values, exactly the centred crop
    assert x.shape == (3, 448, 576) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(((x + 1) / 2 * 255).round().to(torch.uint8), torch.from_numpy(arr[:, 10:586]).permute(2, 0, 1))
    lefts = {place.crop_box(torch.Generator().manual_seed(s))[0] for s in range(400)}
    assert lefts == set(range(22))  # uniform over 0..excess, both ends included (kohya's randint(0, excess))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(bucket_pixels(image, place, g()), bucket_pixels(image, place, g()))


# --- bad settings: one line, exit 2, nothing trained -----------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A kohya folder (2 repeats) of five images in three buckets at 128 px (min 64), with tag captions."""
    root = tmp_path_factory.mktemp("mixed") / "2_sks painting"
    sizes = [(200, 100), (128, 128), (100, 200), (90, 300), (300, 100)]  # 128², 128², 64×192, 64×192, 192×64
    for i, size in enumerate(sizes):
        save(textured_image(40 + i, size), root / f"img_{i}.png")
        (root / f"img_{i}.txt").write_text(f"sks painting, tag{i}a, tag{i}b, tag{i}c, tag{i}d\n")
    return root.parent


def bucketed(mixed, *extra):
    return load_config(ROOT / "configs" / "lora_style.yaml", [
        "model.ref=tiny", f"data.root={mixed}", "data.layout=kohya", "data.style=", "data.resolution=128",
        "data.min_bucket=64", "data.min_size=32", "train.batch_size=2", "train.steps=4", "train.checkpoint_every=2",
        "train.validate_every=0", "validation.steps=2", "validation.num_images=1", "loss.lpips=0", "loss.gram=0",
        "train.log_every=1", *extra])


BAD = [
    (["data.bucket_step=0"], "error: data.bucket_step must be a positive multiple of 64"),
    (["data.bucket_step=96"], "error: data.bucket_step must be a positive multiple of 64"),
    (["data.max_bucket=128", "data.min_bucket=256", "data.resolution=128"], "error: data.max_bucket (128) is below"),
    (["data.min_bucket=256", "data.resolution=128"], "error: data.resolution 128 is outside [data.min_bucket 256"),
    (["data.max_bucket=640", "data.resolution=768"], "error: data.resolution 768 is outside"),
]


@pytest.mark.parametrize("sets, message", BAD)
def test_bad_bucket_settings_are_one_line_and_nothing_trains(sets, message, mixed, tmp_path, capsys, monkeypatch):
    import customgen.train.run as run_module

    monkeypatch.setattr(run_module, "build_run", lambda *a, **k: pytest.fail("training started"))
    out = tmp_path / "out"
    args = ["train", str(ROOT / "configs" / "lora_style.yaml"), "--model", "tiny", "--output", str(out),
            "--set", f"data.root={mixed}", "--set", "data.layout=kohya", "--set", "data.style="]
    assert main(args + sum((["--set", s] for s in sets), [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not out.exists()


def test_min_and_max_off_the_step_are_rounded_as_kohya_rounds_with_one_notice(mixed):
    cfg = bucketed(mixed, "data.min_bucket=100", "data.max_bucket=1000")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        settled = settle_data(cfg)
        again = settle_data(settled)  # a settled config passes through without a second notice
    notices = [w for w in seen if issubclass(w.category, Notice)]
    assert len(notices) == 1 and "data.min_bucket 100 → 64, data.max_bucket 1000 → 1024" in str(notices[0].message)
    assert (settled.data.min_bucket, settled.data.max_bucket) == (again.data.min_bucket, again.data.max_bucket) == \
        (64, 1024)


def test_random_crops_turn_the_latent_cache_off_with_one_notice(mixed):
    with pytest.warns(Notice, match="train.cache_latents is off") as seen:
        cfg = settle_data(bucketed(mixed, "data.center_crop=false"))
    assert len(seen) == 1 and cfg.train.cache_latents is False


# --- the scan command -------------------------------------------------------------------------------------------------
def test_scan_prints_the_bucket_table_and_writes_each_images_bucket(mixed, tmp_path, capsys):
    save(textured_image(9, (40, 300)), mixed / "2_sks painting" / "narrow.png")  # no upscale: 40 < 64, small
    try:
        args = ["data", "scan", str(mixed), "--min-size", "32", "--buckets", "128", "--min-bucket", "64"]
        assert main(args + ["--out", str(tmp_path / "o")]) == 0
        out = capsys.readouterr().out
        report = json.loads((tmp_path / "o" / "scan_report_kohya.json").read_text())
        where = {Path(i["path"]).name: i["bucket"] for i in report["images"]}
        assert where == {"img_0.png": [128, 128], "img_1.png": [128, 128], "img_2.png": [64, 192],
                         "img_3.png": [64, 192], "img_4.png": [192, 64], "narrow.png": [64, 256]}
        rows = {tuple(r["bucket"]): r for r in report["buckets"]}
        assert {b: r["count"] for b, r in rows.items()} == {(64, 192): 2, (64, 256): 1, (128, 128): 2, (192, 64): 1}
        # pixels kept: 192×64 of its 192×64 resize (all) against the square crop's 100²/(300·100) = 1/3
        assert rows[(192, 64)]["kept"] == 1.0 and rows[(192, 64)]["square_kept"] == pytest.approx(1 / 3)
        assert "  192×64          1  100.0%        33.3%" in out
        assert main(args + ["--bucket-no-upscale"]) == 0
        out = capsys.readouterr().out
        assert "1 image(s) with a side below the step (64 px) once shrunk: listed as small, skipped" in out
        assert main(args + ["--bucket-step", "32"]) == 2
        assert capsys.readouterr().err.startswith("error: --bucket-step must be a positive multiple of 64")
    finally:
        (mixed / "2_sks painting" / "narrow.png").unlink()


# --- training: one shape per micro-batch, exact resume, style.json --------------------------------------------------
def spy_shapes(monkeypatch):
    shapes, real = [], loop._denoise
    monkeypatch.setattr(loop, "_denoise", lambda run, latents, *a, **k: shapes.append(tuple(latents.shape)) or
                        real(run, latents, *a, **k))
    return shapes


def test_a_bucketed_run_trains_one_bucket_per_step_and_resumes_exactly(mixed, tmp_path, monkeypatch):
    extra = ("data.shuffle_caption=true", "data.keep_tokens=1", "data.caption_dropout=0.3")
    shapes = spy_shapes(monkeypatch)
    whole = train(bucketed(mixed, *extra), output=tmp_path / "whole", progress=False)
    spec = bucket_spec(128, min_bucket=64)
    sizes = {r.path: (r.width, r.height) for r in scan_images(mixed).records}
    rows = read_captions(whole)
    assert [r["step"] for r in rows] == [1, 1, 2, 2, 3, 3, 4, 4]
    buckets = [spec.place(*sizes[r["image"]]).bucket for r in rows]
    assert all(buckets[i] == buckets[i + 1] for i in range(0, 8, 2))  # each micro-batch: one bucket
    assert len(set(buckets)) == 3  # ... and the run saw every bucket
    assert [s[2:] for s in shapes] == [(h // 8, w // 8) for w, h in buckets[::2]]
    # captions: the first tag stays first, the rest shuffled, some dropped (the seeds give 1 of 8 here)
    kept = [r for r in rows if r["caption"]]
    assert len(kept) < len(rows) and all(r["caption"].startswith("sks painting, tag") for r in kept)
    assert any(not r["caption"].startswith(f"sks painting, {Path(r['image']).stem.replace('img_', 'tag')}a")
               for r in kept)  # shuffled
    training = kinds.read_manifest(whole).training
    assert training["buckets"] == [{"bucket": [64, 192], "count": 2}, {"bucket": [128, 128], "count": 2},
                                   {"bucket": [192, 64], "count": 1}]  # images, not repeats
    with killed_at(monkeypatch, 3):
        train(bucketed(mixed, *extra), output=tmp_path / "cut", progress=False)
    resumed = train(bucketed(mixed, *extra), output=tmp_path / "cut", progress=False)
    assert read_captions(resumed) == rows  # the same batches and captions, written once
    a, b = (load_file(str(p / lora.WEIGHTS)) for p in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_optimizer_steps_examples_share_a_bucket_however_the_batch_is_split():
    """Chunks of the effective batch: batch 4, batch 1 × accumulation 4 and batch 2 on two processes draw the same
    examples for each optimizer step, all from one bucket."""
    sizes = [(200, 100), (128, 128), (100, 200), (90, 300), (300, 100), (128, 128), (64, 256)]
    spec = bucket_spec(128, min_bucket=64)
    records = [ImageRecord(f"x{i}", repeats=1 + i % 2, width=w, height=h) for i, (w, h) in enumerate(sizes)]
    ds = ImageDataset(records, resolution=128, placements=[spec.place(w, h) for w, h in sizes])
    images = ImageSet(ds, None)
    for step in range(12):  # several epochs
        four = images.positions(step=step, batch_size=4, seed=5, chunk=4)
        ones = sum((images.positions(step=4 * step + m, batch_size=1, seed=5, chunk=4) for m in range(4)), [])
        twos = sum((images.positions(step=step, batch_size=2, seed=5, chunk=4, rank=r, world=2) for r in range(2)), [])
        assert four == ones == twos
        assert len({ds.placements[ds.order[p]].bucket for p in four}) == 1
    epoch = sum(-(-n // 4) * 4 for n in (3, 1, 5, 1))  # examples (repeats) of 64×192, 64×256, 128², 192×64
    seen = sum((images.positions(step=s, batch_size=4, seed=5, chunk=4) for s in range(epoch // 4)), [])
    assert set(seen) == set(range(len(ds)))  # an epoch shows every example


def test_class_images_stay_square_beside_a_non_square_bucket(tmp_path, monkeypatch):
    folder = tmp_path / "wide"
    save(textured_image(1, (300, 100)), folder / "Wide" / "a.png")
    cfg = load_config(ROOT / "configs" / "dreambooth_style.yaml", [
        "model.ref=tiny", f"data.root={folder}", "data.style=Wide", "data.resolution=128", "data.min_bucket=64",
        "data.min_size=32", "prompt.num_class_images=1", "prompt.class_steps=2", "train.batch_size=1"])
    run = build_run(cfg, tmp_path / "out")
    loop.offload_unused(run)
    shapes = spy_shapes(monkeypatch)
    losses = loop.step_losses(run, 0)
    assert shapes == [(1, 4, 8, 24), (1, 4, 16, 16)]  # the 192×64 instance batch, then the 128² class image
    assert torch.isfinite(losses["prior"]).all() and torch.isfinite(losses["l2"]).all()


# --- latent cache -------------------------------------------------------------------------------------------------
def _tiny_vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()


def test_the_latent_cache_encodes_each_image_at_its_bucket_and_is_reused_across_buckets(mixed, tmp_path):
    records = scan_images(mixed, min_size=32).records
    vae = _tiny_vae()

    def dataset(spec):
        return ImageDataset(records, resolution=128, placements=[spec.place(r.width, r.height) for r in records])

    first = dataset(bucket_spec(128, min_bucket=64))
    cache = LatentCache(vae, cache_dir=tmp_path / "cache")
    got = cache.get(first)
    assert cache.encoded == 5 and [tuple(m.shape) for m in got.mean] == [
        (4, 64, 64), (4, 64, 64), (4, 96, 32), (4, 96, 32), (4, 32, 96)]  # (4, h/2, w/2): this VAE halves once
    with torch.no_grad():  # each bucket's images went through the encoder together, centred crops
        pixels = torch.stack([bucket_pixels(load_image(records[i].path), first.placements[i]) for i in (2, 3)])
        ref = vae.encode(pixels).latent_dist
    assert torch.equal(torch.stack(got.mean[2:4]), ref.mean * vae.config.scaling_factor)
    sample = got.sample([2, 3], generator=[torch.Generator().manual_seed(i) for i in range(2)])
    assert sample.shape == (2, 4, 96, 32)
    # Other settings: min_bucket 128 leaves only the square bucket; 128² images keep theirs and are not encoded again
    again = LatentCache(vae, cache_dir=tmp_path / "cache")
    again.get(dataset(bucket_spec(128, min_bucket=128)))
    assert again.encoded == 3  # the three that moved; the two 128² ones come from the cache


# --- captions -------------------------------------------------------------------------------------------------------
def test_caption_dropout_and_shuffle_are_kohyas_and_seeded():
    caption = "sks, red hair,  smile , outdoors, night"
    rules = CaptionRules(dropout=0.25, shuffle=True, keep_tokens=2)
    out = [rules.apply(caption, torch.Generator().manual_seed(s)) for s in range(2000)]
    assert out == [rules.apply(caption, torch.Generator().manual_seed(s)) for s in range(2000)]  # seeded
    dropped = sum(o == "" for o in out) / len(out)
    assert abs(dropped - 0.25) < 4 * (0.25 * 0.75 / len(out)) ** 0.5  # 4σ of a binomial
    kept = [o for o in out if o]
    assert all(o.split(", ")[:2] == ["sks", "red hair"] for o in kept)  # the first keep_tokens in place
    assert all(sorted(o.split(", ")[2:]) == ["night", "outdoors", "smile"] for o in kept)  # stripped, joined ", "
    assert len({o for o in kept}) == 6  # every order of the other three
    assert CaptionRules(shuffle=False).apply(caption, torch.Generator()) == caption  # no shuffle: as written
    g = torch.Generator().manual_seed(0)
    CaptionRules().apply(caption, g)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())  # nothing drawn when off


def test_caption_extension_picks_one_sidecar(tmp_path):
    save(textured_image(1, (64, 64)), tmp_path / "f" / "a.png")
    (tmp_path / "f" / "a.txt").write_text("from txt")
    (tmp_path / "f" / "a.caption").write_text("from caption")
    captions = {ext: scan_images(tmp_path / "f", layout="folder", caption_extension=ext).records[0].caption
                for ext in ("", ".txt", ".caption")}
    assert captions == {"": "from txt", ".txt": "from txt", ".caption": "from caption"}
    with pytest.raises(UserError, match="data.caption_extension"):
        load_config(None, ["data.caption_extension=.md"])


# --- the memory plan for a non-square bucket -------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["lora_style", "dreambooth_style"])
def test_the_plan_predicts_a_non_square_bucket_within_five_percent_of_a_cpu_run(recipe):
    """At 96 px (step 64, min 64) the square bucket is 64² and 64×128 has more pixels: the plan counts the step at
    64×128 (with prior preservation, the square class images in their own UNet call) as test_plan does, fake CUDA
    tensors against real CPU ones, within 5%."""
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml", [
        "model.ref=tiny", "data.resolution=96", "data.min_bucket=64", "train.batch_size=2", "loss.gram=0",
        "loss.perceptual_max_timestep=1000", "loss.lpips_net=alex"])
    plan = MemoryPlan("no", False, "adamw", offload=False)
    fake = estimate_training(cfg, plan)
    torch.manual_seed(0)
    real = estimate_training(cfg, plan, fake=False)
    assert fake.settings["image"] == [64, 128]
    for part in ("step_peak", "validation_peak", "setup_peak"):
        assert getattr(fake, part) == pytest.approx(getattr(real, part), rel=0.05), part


def test_the_square_bucket_the_plan_counts_peaks_at_least_as_high_as_its_equal_area_rivals(monkeypatch):
    """At 128 px (min 64) 128×128, 64×256 and 256×64 all hold 128² pixels: the plan counts the square one
    (BucketSpec.largest), which must not predict less than the others."""
    import customgen.train.estimate as estimate

    cfg = load_config(ROOT / "configs" / "dreambooth_style.yaml", [
        "model.ref=tiny", "data.resolution=128", "data.min_bucket=64", "train.batch_size=2"])
    assert bucket_spec(128, min_bucket=64).largest() == (128, 128)
    plan = MemoryPlan("fp16", False, "adamw", offload=True, batch_size=2, grad_accum=1)
    peaks = {}
    for shape in [(128, 128), (64, 256), (256, 64)]:
        monkeypatch.setattr(estimate, "run_shape", lambda c, s=shape: s)
        peaks[shape] = estimate.estimate_training(cfg, plan).step_peak
    assert peaks[(128, 128)] >= max(peaks.values())


def test_the_style_recipes_and_presets_turn_buckets_on_and_the_subject_recipes_leave_them_off():
    on = {"lora_style", "dreambooth_style", "textual_inversion", "style_lora_plan", "style_dreambooth_plan",
          "style_textual_inversion_plan"}
    for name in on | {"dreambooth_lora_subject", "lora_anime_kohya", "subject_report", "anime_lora_writeup"}:
        assert load_config(find_config(name)).data.buckets == (name in on), name
    assert load_config(None).data.buckets is False  # the typed default: kohya's (--enable_bucket is a flag)
