"""Subject metrics (DreamBooth's DINO, CLIP-I, CLIP-T, DIV, PRES) against independent numpy computations on fixed
embeddings; the CLIP-T prompt rewrite on the project's and the DreamBooth paper's prompts; the prompt sets; the DINO
loading code up to the network boundary (local folder, Hub cache, download, offline smoke fallback)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from customgen import metrics as M
from customgen.evaluate.subjects import prompts as P
from customgen.metrics import dino_network as D
from customgen.metrics import networks as N

FIVE = {  # the project's five prompts with token sks and class dog → what CLIP-T compares with
    "a sks dog on the beach": "a dog on the beach",
    "a sks dog in the snow": "a dog in the snow",
    "a sks dog wearing a red hat": "a dog wearing a red hat",
    "a painting of a sks dog in the style of Van Gogh": "a painting of a dog in the style of Van Gogh",
    "a sks dog on a wooden floor": "a dog on a wooden floor",
}


# ---------------------------------------------------------------- prompts
def test_clip_t_prompt_rewrite_on_the_project_prompts():
    filled = [P.fill(t, token="sks", noun="dog") for t in P.PROJECT_PROMPTS]
    assert filled == list(FIVE)
    assert [M.fidelity_prompt(p, "sks") for p in filled] == list(FIVE.values())


def test_clip_t_prompt_rewrite_removes_whole_tokens_only():
    assert M.fidelity_prompt("a sks dog asks for sks", "sks") == "a dog asks for"
    assert M.fidelity_prompt("a photo of <my-dog> , running", "<my-dog>") == "a photo of, running"
    assert M.fidelity_prompt("a  dog   on the beach", "") == "a dog on the beach"


@pytest.mark.parametrize("templates", [P.DREAMBOOTH_OBJECT_PROMPTS, P.DREAMBOOTH_LIVE_PROMPTS])
def test_clip_t_prompt_rewrite_on_the_dreambooth_prompt_lists(templates):
    for t in templates:
        with_token = P.fill(t, token="sks", noun="backpack")
        assert "sks backpack" in with_token
        assert M.fidelity_prompt(with_token, "sks") == " ".join(t.format(token="", noun="backpack").split())


def test_dreambooth_prompt_lists_as_published():
    obj, live = P.DREAMBOOTH_OBJECT_PROMPTS, P.DREAMBOOTH_LIVE_PROMPTS
    assert len(obj) == len(set(obj)) == 25 and len(live) == len(set(live)) == 25
    assert obj[:10] == live[:10] and obj[-5:] == live[-5:]  # the file's shared scenes and properties
    assert obj[0] == "a {token} {noun} in the jungle" and obj[-1] == "a cube shaped {token} {noun}"
    assert "a {token} {noun} floating in an ocean of milk" in obj and "a {token} {noun} in a chef outfit" in live
    assert all(t.count("{token} {noun}") == 1 for t in obj + live)


@pytest.mark.parametrize("class_prompt, instance, noun", [
    ("a photo of dog", "", "dog"), ("a photo of a dog", "", "dog"), ("A photo of an old teapot.", "", "old teapot"),
    ("a photo of a stuffed animal", "", "stuffed animal"), ("", "a photo of sks person", "person"),
    ("", "sks", ""), ("", "a photo of a dog", ""),
])
def test_class_noun(class_prompt, instance, noun):
    assert P.class_noun(class_prompt=class_prompt, instance_prompt=instance, token="sks") == noun


def test_prompt_set_by_class_noun():
    for noun in ("dog", "cat", "person", "dogs", "small puppy"):
        assert P.prompt_templates("dreambooth", noun) == P.DREAMBOOTH_LIVE_PROMPTS, noun
    for noun in ("backpack", "teapot", "stuffed animal", "sneaker"):  # the dataset's plushies are objects
        assert P.prompt_templates("dreambooth", noun) == P.DREAMBOOTH_OBJECT_PROMPTS, noun
    assert P.prompt_templates("project", "backpack") == P.PROJECT_PROMPTS
    with pytest.raises(Exception, match="subject_prompts"):
        P.prompt_templates("paper", "dog")


# ---------------------------------------------------------------- metrics on fixed embeddings
class FixedEncoder:
    """An ImageEncoder whose image features are fixed vectors chosen by an id in the image's first pixel, and whose
    text features are fixed vectors per text."""

    def __init__(self, vectors: np.ndarray, texts: dict[str, np.ndarray] | None = None, smoke: bool = True):
        self.vectors, self.texts, self.asked = vectors, texts or {}, []
        self.name, self.smoke = f"fixed-{id(self)}", smoke

    def encode(self, images):
        return np.stack([self.vectors[np.asarray(im)[0, 0, 0]] for im in images])

    def encode_text(self, texts):
        self.asked += list(texts)
        return np.stack([self.texts[t] for t in texts])


def image(i: int, size: int = 32) -> Image.Image:
    """A gradient image whose first pixel holds the id `i` (not degenerate)."""
    a = np.tile(np.linspace(0, 255, size, dtype=np.uint8)[None, :, None], (size, 1, 3))
    a[0, 0, 0] = i
    return Image.fromarray(a)


def cos(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture
def fixed():
    rng = np.random.default_rng(0)
    return FixedEncoder(rng.standard_normal((10, 7)), {"a dog on the beach": rng.standard_normal(7)})


@pytest.mark.parametrize("metric", [M.dino, M.clip_i])
def test_identity_metrics_match_numpy(metric, fixed):
    out, refs = image(0), [image(i) for i in (3, 4, 5)]
    r = metric(out, refs, encoder=fixed, cache=M.FeatureCache())
    want = [cos(fixed.vectors[0], fixed.vectors[i]) for i in (3, 4, 5)]
    assert r.value == pytest.approx(np.mean(want), rel=1e-6) and list(r.per_item) == pytest.approx(want, rel=1e-6)
    assert (r.name, r.n_ref, r.smoke, r.flag) == (metric.__name__, 3, True, None)
    assert metric(refs[0], refs[:1], encoder=fixed, cache=M.FeatureCache()).value == pytest.approx(1.0, abs=1e-6)


def test_clip_t_matches_numpy_and_asks_without_the_token(fixed):
    r = M.clip_t(image(2), "a sks dog on the beach", token="sks", encoder=fixed, cache=M.FeatureCache())
    assert fixed.asked == ["a dog on the beach"]
    assert r.value == pytest.approx(cos(fixed.vectors[2], fixed.texts["a dog on the beach"]), rel=1e-6)


def test_pres_matches_numpy_and_leaves_degenerate_images_out(fixed):
    outs, refs = [image(1), image(2), image(6)], [image(3), image(4)]
    per = [np.mean([cos(fixed.vectors[o], fixed.vectors[r]) for r in (3, 4)]) for o in (1, 2, 6)]
    r = M.pres(outs, refs, encoder=fixed, cache=M.FeatureCache())
    assert r.value == pytest.approx(np.mean(per), rel=1e-6) and r.std == pytest.approx(np.std(per, ddof=1), rel=1e-6)
    assert (r.n, r.n_ref) == (3, 2)
    black = M.pres([image(1), Image.new("RGB", (32, 32))], refs, encoder=fixed, cache=M.FeatureCache())
    assert black.n == 1 and black.value == pytest.approx(per[0], rel=1e-6)


def test_identity_of_a_nan_output_is_nan_and_flagged(fixed):
    r = M.dino(np.full((32, 32, 3), np.nan), [image(3)], encoder=fixed, cache=M.FeatureCache())
    assert math.isnan(r.value) and r.flag == "nan"


class FixedLpips:
    """An LPIPS stand-in with fixed per-image features: distance = squared Euclidean distance."""

    smoke = False

    def __init__(self, vectors):
        self.vectors = vectors

    def features(self, arrays):
        return [torch.from_numpy(np.stack([self.vectors[int(round(a[0, 0, 0] * 255))] for a in arrays]))]

    def distance(self, feats, reference):
        return ((feats[0] - reference[0]) ** 2).sum(dim=1).numpy()


def test_div_matches_numpy_over_all_pairs():
    vectors = np.random.default_rng(1).standard_normal((10, 5))
    ids = [1, 2, 5, 7, 9]
    r = M.div([image(i) for i in ids], net=FixedLpips(vectors), batch_size=2)  # batches split the features
    pairs = [((vectors[a] - vectors[b]) ** 2).sum() for k, a in enumerate(ids) for b in ids[k + 1:]]
    assert r.per_item == pytest.approx(pairs, rel=1e-9) and r.value == pytest.approx(np.mean(pairs), rel=1e-9)
    assert r.n == 5 and len(r.per_item) == 10


def test_div_of_identical_images_is_zero_and_equals_pairwise_lpips():
    net = N.build_lpips_scorer(net="alex", smoke=True, device="cpu")
    same = [image(3, 64)] * 4
    r = M.div(same, net=net)
    assert r.value == 0.0 and r.smoke and len(r.per_item) == 6
    rng = np.random.default_rng(2)
    varied = [np.clip(rng.random((64, 64, 3)), 0, 1) for _ in range(3)]
    pairwise = [M.lpips(varied[a], varied[b], net=net).value for a, b in ((0, 1), (0, 2), (1, 2))]
    assert M.div(varied, net=net).value == pytest.approx(np.mean(pairwise), rel=1e-5)  # batched vs one by one
    few = M.div([varied[0], np.zeros((64, 64, 3))], net=net)
    assert math.isnan(few.value) and few.flag == "too_few_samples" and few.n == 1


# ---------------------------------------------------------------- networks
def test_clip_text_tower_matches_open_clip():
    import open_clip

    emb = N.build_clip_embedder(smoke=True, device="cpu")
    texts = ["a dog on the beach", "a photo of a dog"]
    with torch.no_grad():
        want = emb.model.encode_text(open_clip.get_tokenizer("ViT-B-32")(texts)).numpy()
    got = emb.encode_text(texts)
    assert got.shape == (2, emb.encode([image(0, 64)]).shape[1]) and np.array_equal(got, want)


def tiny_vit(folder=None, *, processor: bool = True) -> ViTModel:
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               patch_size=8, image_size=32), add_pooling_layer=False).eval()
    if folder is not None:
        model.save_pretrained(folder)
        if processor:
            D.dino_processor(32).save_pretrained(folder)
    return model


@pytest.mark.parametrize("processor", [True, False])
def test_dino_loads_a_local_folder(tmp_path, processor):
    model = tiny_vit(tmp_path / "dino", processor=processor)
    enc = D.build_dino_encoder(model=str(tmp_path / "dino"), device="cpu", offline=True)
    assert not enc.smoke and enc.source == f"folder:{(tmp_path / 'dino').resolve()}"
    ims = [image(1, 48), image(2, 48)]
    x = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=D.IMAGENET_MEAN, image_std=D.IMAGENET_STD)(
        images=ims, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = model(pixel_values=x).last_hidden_state[:, 0].numpy()
    assert np.allclose(enc.encode(ims), want, rtol=1e-5, atol=1e-6)  # CLS of the last layer, DINO preprocessing


class Recorder:
    """Stands in for ViTModel/ViTImageProcessor.from_pretrained at the network boundary: records its calls."""

    def __init__(self, result=None, error=None):
        self.calls, self.result, self.error = [], result, error

    def __call__(self, ref, **kw):
        self.calls.append((ref, kw))
        if self.error:
            raise self.error
        return self.result


@pytest.mark.parametrize("cached, offline, reachable, source", [
    (True, True, False, "cache:facebook/dino-vits16"),  # in the HF cache: loaded offline, local files only
    (False, False, True, "download:facebook/dino-vits16"),  # online, not cached: downloaded
    (False, True, True, None),  # offline, not cached: smoke, no loading attempted
])
def test_dino_hub_loading_up_to_the_network(monkeypatch, cached, offline, reachable, source):
    model, proc = Recorder(tiny_vit()), Recorder(D.dino_processor(32))
    monkeypatch.setattr(D.ViTModel, "from_pretrained", model)
    monkeypatch.setattr(D.ViTImageProcessor, "from_pretrained", proc)
    monkeypatch.setattr(D, "try_to_load_from_cache", lambda repo, name: "/cache/config.json" if cached else None)
    monkeypatch.setattr(D, "hub_reachable", lambda: reachable)
    enc = D.build_dino_encoder(device="cpu", offline=offline)
    if source is None:
        assert enc.smoke and "offline" in enc.source and model.calls == [] and proc.calls == []
        return
    assert not enc.smoke and enc.source == source and enc.name == "dino:facebook/dino-vits16"
    assert model.calls == [("facebook/dino-vits16", {"add_pooling_layer": False, "local_files_only": cached})]
    assert proc.calls == [("facebook/dino-vits16", {"local_files_only": cached})]


def test_dino_loading_failure_falls_back_to_smoke(monkeypatch):
    monkeypatch.setattr(D.ViTModel, "from_pretrained", Recorder(error=OSError("connection reset")))
    monkeypatch.setattr(D, "try_to_load_from_cache", lambda repo, name: None)
    monkeypatch.setattr(D, "hub_reachable", lambda: True)
    enc = D.build_dino_encoder(device="cpu", offline=False)
    assert enc.smoke and "OSError: connection reset" in enc.source


def test_smoke_dino_is_a_seeded_vit_s16():
    nets = M.MetricNetworks(smoke=True, device="cpu")
    enc = nets.dino
    c = enc.model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.patch_size) == (
        384, 12, 6, 1536, 16)
    assert enc.smoke and nets.describe()["dino"]["smoke"] and "smoke mode requested" in enc.source
    ims = [image(1, 64), image(2, 80)]
    again = D.build_dino_encoder(smoke=True, device="cpu", seed=0)
    assert enc.encode(ims).shape == (2, 384) and np.array_equal(enc.encode(ims), again.encode(ims))
    assert D.build_dino_encoder(smoke=True, device="cpu", seed=1).name != enc.name
