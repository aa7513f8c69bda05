"""customgen.metrics: values checked against independent references, offline, CPU, random-weight networks."""
import math
import time

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg
from skimage.metrics import structural_similarity

from customgen import metrics as M
from customgen.metrics import networks as N
from tests.tolerance import gamma, ssim_moment_rounding, ssim_rounding


# ---------------------------------------------------------------- fixtures
def _structured(h=64, w=64, phase=0.0):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([np.sin(xx / 5 + phase), np.cos(yy / 7), (xx + yy) / (h + w)], -1) * 0.5 + 0.5


@pytest.fixture(scope="module")
def embedder():
    """Tiny random open_clip ViT, built through the package's open_clip smoke path."""
    return N.build_clip_embedder(smoke=True, device="cpu")


@pytest.fixture(scope="module")
def lpips_alex():
    return N.build_lpips_scorer(net="alex", smoke=True, device="cpu")


@pytest.fixture
def images(tmp_path):
    """Three distinct RGB images saved as PNG files."""
    rng = np.random.default_rng(1)
    paths = []
    for i, arr in enumerate([_structured(), _structured(phase=2.0), rng.random((64, 64, 3))]):
        p = tmp_path / f"im{i}.png"
        Image.fromarray((arr * 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def _count_forwards(embedder):
    calls = []
    handle = embedder.model.visual.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return calls, handle


# ---------------------------------------------------------------- SSIM
@pytest.mark.parametrize("shape", [(64, 64), (37, 53), (16, 16)])
def test_ssim_matches_skimage_gaussian(shape):
    rng = np.random.default_rng(0)
    a = rng.random((*shape, 3))
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    c = _structured(*shape)
    d = np.clip(0.8 * c + 0.05 * rng.standard_normal(c.shape), 0, 1)
    for x, y in [(a, b), (c, d), (c, a)]:
        ref = structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=1, channel_axis=-1)
        r = M.ssim(x, y)
        assert r.value == pytest.approx(ref, abs=ssim_rounding(x, y))
        assert r.name == "ssim" and r.smoke is False and r.flag is None


def test_ssim_identity_and_resize_to_reference():
    c = _structured(64, 64)
    # identical inputs: S = 1 except where E[x²] − μ² rounds below 0 (clamped to 0): ≤ 2·2 moments' rounding / C2
    assert M.ssim(c, c).value == pytest.approx(1.0, abs=4 * ssim_moment_rounding() / 0.03 ** 2)
    big = M.to_array(Image.fromarray((c * 255).astype(np.uint8)).resize((128, 128), Image.BICUBIC))
    # the output is resized to the reference (content) size, so a larger output still compares
    assert M.ssim(big, c).value == M.ssim(M.images.resize_to(big, (64, 64)), c).value  # the same resize, then SSIM
    assert M.ssim(big, c).value > 0.9
    with pytest.raises(ValueError, match="at least 11"):
        M.ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))


# ---------------------------------------------------------------- FID / KID / ArtFID
def _scipy_frechet(a, b):
    """Independent reference: the pytorch-fid formula with scipy.linalg.sqrtm."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _frechet_rounding(a, b) -> float:
    """Bound on float64 rounding in FID = ‖μa − μb‖² + tr Σa + tr Σb − 2·tr √(Σa·Σb) (Heusel et al. 2017).

    Σa·Σb is diagonalisable by Σa^½·Q (Σa^½·Σb·Σa^½ = Q·Λ·Qᵀ), so a backward-stable eigensolver's error
    p(n)·u·‖Σa‖‖Σb‖ (p(n) = n², LAPACK Users' Guide §4.7) moves each eigenvalue by at most κ = √cond(Σa) times
    that (Bauer–Fike; κ = 1 for a = b, Σa² being symmetric), the root of an eigenvalue λ > that shift by the
    shift over 2√(λ − shift), any other root by ≤ √(2·shift); for a = b those are exact zeros, whose computed
    roots only lower FID, which is clipped at 0. Means and traces: γ_{N+n}·their size (Higham 2002, §3.1)."""
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    n, u = s1.shape[0], 2.0 ** -53
    kappa = 1.0 if a is b else math.sqrt(np.linalg.cond(s1))
    lam = np.abs(np.linalg.eigvals(s1 @ s2))
    shift = kappa * n * n * u * np.linalg.norm(s1, 2) * np.linalg.norm(s2, 2)
    big = lam[lam > shift]
    roots = (shift / (2 * np.sqrt(big - shift))).sum() + (0 if a is b else np.sqrt(2 * shift) * (lam <= shift).sum())
    size = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2)
    return float(2 * roots + gamma(len(a) + len(b) + n, torch.float64) * size)


def test_fid_matches_scipy_reference():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 16))
    b = rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16)) * 0.5 + 0.3
    r = M.fid(a, b)
    assert r.value == pytest.approx(_scipy_frechet(a, b), abs=2 * _frechet_rounding(a, b))  # two implementations
    assert (r.n, r.n_ref, r.note, r.smoke) == (400, 300, None, False)
    assert M.fid(torch.from_numpy(a), torch.from_numpy(b)).value == r.value  # the same float64 computation


def test_fid_of_a_set_with_itself_is_zero_even_when_singular():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8))
    assert M.fid(x, x).value == pytest.approx(0.0, abs=_frechet_rounding(x, x))
    small = rng.standard_normal((10, 64))  # N < D: covariance rank 9
    r = M.fid(small, small)
    assert r.value == pytest.approx(0.0, abs=_frechet_rounding(small, small))
    assert "singular" in r.note
    assert math.isnan(M.fid(small[:1], small).value) and M.fid(small[:1], small).flag == "too_few_samples"


def _numpy_unbiased_mmd2(x, y):
    """Independent reference: unbiased MMD² with k(x, y) = (x·y / d + 1)³ (Bińkowski et al. 2018)."""
    d, m = x.shape[1], x.shape[0]
    k = lambda p, q: (p @ q.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()


def test_kid_matches_reference_and_separates_distributions():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((150, 8)), rng.standard_normal((150, 8))
    far = rng.standard_normal((150, 8)) * 2.0 + 1.0
    full = M.kid(a, far, subset_size=150, n_subsets=1)  # one subset = everything: no sampling
    # float64: each kernel value takes d + 4 roundings, each sum ≤ m² more, relative to the sums of |k|
    k = lambda p, q: np.abs(p @ q.T / a.shape[1] + 1) ** 3  # noqa: E731
    size = (k(a, a).sum() + k(far, far).sum()) / (150 * 149) + 2 * k(a, far).mean()
    assert full.value == pytest.approx(_numpy_unbiased_mmd2(a, far), abs=2 * gamma(150 ** 2 + 12, torch.float64) * size)
    same = M.kid(a, b, subset_size=50, n_subsets=20, seed=0)
    diff = M.kid(a, far, subset_size=50, n_subsets=20, seed=0)
    assert abs(same.value) < 0.05 and diff.value > 1.0
    assert len(diff.per_item) == 20 and diff.std == np.std(diff.per_item)  # the same numpy call
    assert M.kid(a, b, subset_size=50, n_subsets=5, seed=3).value == M.kid(a, b, subset_size=50, n_subsets=5,
                                                                          seed=3).value
    reduced = M.kid(a[:30], b, subset_size=1000, n_subsets=3)
    assert (reduced.n, reduced.n_ref) == (30, 150) and "reduced to 30" in reduced.note


def test_art_fid_formula_and_smoke_propagation():
    assert M.art_fid(0.25, 3.0).value == 1.25 * 4.0  # exact in binary
    lp = M.MetricResult("lpips", 0.5, smoke=True)
    fd = M.MetricResult("fid", 10.0, n=40, n_ref=25)
    r = M.art_fid(lp, fd)
    assert (r.value, r.smoke, r.n, r.n_ref) == (16.5, True, 40, 25)


def test_image_level_fid_kid_leave_out_degenerate_outputs(images):
    enc = N.SmokeCNN(seed=0)
    cache = M.FeatureCache()
    outs = [*images, np.zeros((64, 64, 3))]  # one safety-checker black image
    r = M.fid_images(outs, images, extractor=enc, cache=cache)
    assert r.smoke is True and (r.n, r.n_ref) == (3, 3) and "left out 1 degenerate" in r.note
    feats = np.asarray(enc.encode([M.load_image(p) for p in images]), dtype=np.float64)  # (3, D): rank 2
    assert r.value == pytest.approx(0.0, abs=_frechet_rounding(feats, feats))  # the same 3 images on both sides
    k = M.kid_images(images, images, extractor=enc, cache=cache, subset_size=3, n_subsets=2)
    assert k.smoke is True and k.n == 3 and math.isfinite(k.value)


# ---------------------------------------------------------------- CLIP scores
def test_clip_content_and_style_values(embedder, images):
    cache = M.FeatureCache()
    same = M.clip_content(images[0], images[0], embedder=embedder, cache=cache)
    # 1 − a·b/(‖a‖‖b‖) in float64: two length-D sums, two roots, a product and a quotient (Higham 2002, §3.1)
    rounding = gamma(2 * embedder.encode([M.load_image(images[0])]).shape[1] + 6, torch.float64)
    assert same.value == pytest.approx(0.0, abs=rounding) and same.smoke is True
    d01 = M.clip_content(images[0], images[1], embedder=embedder, cache=cache).value
    d02 = M.clip_content(images[0], images[2], embedder=embedder, cache=cache).value
    assert d01 > 1e-4 and d02 > 1e-4
    style = M.clip_style(images[0], [images[1], images[2]], embedder=embedder, cache=cache)
    assert style.per_item == pytest.approx((d01, d02), abs=2 * rounding)  # a 2-row product vs two 1-row ones
    assert style.value == pytest.approx((d01 + d02) / 2, abs=2 * rounding) and style.n_ref == 2


def test_style_strength_ratio_baseline_and_zero_baseline():
    assert M.style_strength(0.3, 0.3).value == 1.0
    assert M.style_strength(0.3, 0.15).value == 2.0  # 0.15 is 0.3 halved in binary: exact quotients
    zero = M.style_strength(0.3, 0.0)
    assert math.isnan(zero.value) and zero.flag == "zero_baseline" and "undefined" in zero.note
    r = M.style_strength(M.MetricResult("clip_content", 0.2, smoke=True), M.MetricResult("clip_content", 0.4))
    assert r.value == 0.5 and r.smoke is True


def test_feature_cache_skips_network_in_memory_and_on_disk(embedder, images, tmp_path):
    calls, handle = _count_forwards(embedder)
    try:
        cache = M.FeatureCache(tmp_path / "feats")
        first = M.clip_content(images[0], images[1], embedder=embedder, cache=cache)
        assert sum(calls) == 2
        again = M.clip_content(images[0], images[1], embedder=embedder, cache=cache)
        assert sum(calls) == 2 and again.value == first.value  # no forward at all on the re-run
        files = sorted((tmp_path / "feats").rglob("*.safetensors"))
        assert [f.stem for f in files] == sorted({M.image_digest(images[0]), M.image_digest(images[1])})
        fresh = M.FeatureCache(tmp_path / "feats")  # a new process: read from disk
        assert M.clip_content(images[0], images[1], embedder=embedder, cache=fresh).value == first.value
        assert sum(calls) == 2
        M.clip_style(images[2], [images[0], images[1]], embedder=embedder, cache=fresh)
        assert sum(calls) == 3  # only the new image was encoded
    finally:
        handle.remove()


# ---------------------------------------------------------------- LPIPS
def test_lpips_zero_for_identical_positive_for_different(lpips_alex):
    c, d = _structured(), _structured(phase=2.0)
    same = M.lpips(c, c, net=lpips_alex)
    assert same.value == 0.0 and same.smoke is True  # the same network call on the same image on both sides
    assert M.lpips(c, d, net=lpips_alex).value > 1e-4
    assert M.lpips(c, np.random.default_rng(0).random((64, 64, 3)), net=lpips_alex).value > 1e-4
    with pytest.raises(ValueError, match="unknown LPIPS net"):
        N.build_lpips_scorer(net="resnet", smoke=True)


# ---------------------------------------------------------------- degenerate outputs, aggregation
def test_is_degenerate_and_flags_on_metrics(embedder):
    nan_img = _structured()
    nan_img[3, 3, 0] = np.nan
    assert M.is_degenerate(Image.new("RGB", (32, 32))) == "black"
    assert M.is_degenerate(nan_img) == "nan"
    assert M.is_degenerate(np.full((32, 32, 3), 0.5)) == "constant"
    assert M.is_degenerate(_structured()) is None
    black = M.ssim(np.zeros((64, 64, 3)), _structured())
    assert black.flag == "black" and math.isfinite(black.value)
    r = M.clip_content(nan_img, _structured(), embedder=embedder, cache=M.FeatureCache())
    assert r.flag == "nan" and math.isnan(r.value)


def test_summarize_leaves_out_flagged_and_nonfinite_rows():
    s = M.summarize([1.0, 2.0, 100.0, 3.0, math.nan], ["", None, "black", None, None])
    assert (s.mean, s.n, s.n_flagged, s.n_nonfinite) == (2.0, 3, 1, 1)  # exact in binary, as below
    assert s.std == 1.0
    rows = [M.MetricResult("ssim", 0.4), M.MetricResult("ssim", 0.0, flag="black"),
            M.MetricResult("ssim", 0.6, smoke=True)]
    s2 = M.summarize(rows)  # flags taken from the results themselves
    assert (s2.mean, s2.n, s2.n_flagged, s2.smoke) == (0.5, 2, 1, True)  # fl(0.4 + 0.6) = 1
    assert M.summarize([]).n == 0 and math.isnan(M.summarize([]).mean)


# ---------------------------------------------------------------- networks: offline fallback, cache lookup
def test_offline_networks_fall_back_to_smoke_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    t0 = time.perf_counter()
    nets = M.MetricNetworks(offline=True, device="cpu", clip_cache_dir=str(tmp_path / "hf"))
    desc = {k: (nets.clip, nets.lpips("alex"), nets.inception)[i].smoke for i, k in enumerate("abc")}
    assert desc == {"a": True, "b": True, "c": True}
    assert time.perf_counter() - t0 < 20  # no download attempt, no network timeout
    info = nets.describe()
    assert set(info) == {"clip", "lpips_alex", "inception"} and all(v["smoke"] for v in info.values())
    assert "offline" in info["clip"]["source"] and "offline" in info["lpips_alex"]["source"]


def test_cached_weight_lookup_finds_files_without_downloading(tmp_path, monkeypatch):
    repo = tmp_path / "hf" / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    weights = repo / "snapshots" / "abc123" / "open_clip_model.safetensors"
    assert N.cached_clip_checkpoint("ViT-B-32", "openai", str(tmp_path / "hf")) is None
    weights.write_bytes(b"stub")
    assert N.cached_clip_checkpoint("ViT-B-32", "openai", str(tmp_path / "hf")) == str(weights)
    assert N.cached_clip_checkpoint("ViT-B-32", str(weights)) == str(weights)  # an explicit local file
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    assert N.hub_checkpoint("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth") is None
    (tmp_path / "torch" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torch" / "checkpoints" / "alexnet-owt-7be5be79.pth").write_bytes(b"stub")
    assert N.hub_checkpoint("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth") is not None


def test_smoke_networks_are_deterministic(images):
    a = N.build_clip_embedder(smoke=True, device="cpu", seed=0)
    b = N.build_clip_embedder(smoke=True, device="cpu", seed=0)
    ims = [M.load_image(p) for p in images]
    assert np.array_equal(a.encode(ims), b.encode(ims)) and a.name == b.name
    assert N.build_clip_embedder(smoke=True, device="cpu", seed=1).name != a.name


# ---------------------------------------------------------------- cost
def test_cost_helpers(tmp_path):
    calls = []
    t = M.time_per_image(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and 0 <= t < 0.1
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 23)
    assert M.artifact_bytes(tmp_path / "a.bin") == 100 and M.artifact_bytes(tmp_path) == 123
    with pytest.raises(FileNotFoundError):
        M.artifact_bytes(tmp_path / "missing")
    with M.peak_memory(device="cpu") as mem:
        torch.ones(10)
    assert mem.peak_bytes is None


def test_result_row_shape():
    row = M.MetricResult("kid", 0.1, std=0.01, n=10, n_ref=20, note="x").as_row()
    assert row == {"metric": "kid", "value": 0.1, "std": 0.01, "n": 10, "n_ref": 20, "smoke": False,
                   "flag": None, "note": "x"}
