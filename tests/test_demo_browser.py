"""The Gradio demo: CLI binding defaults, readable errors, mask handling, and a real browser session
(headless Chromium via Playwright) against the app served on 127.0.0.1 with the `tiny` model."""
from __future__ import annotations

import os
import socket
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported anywhere

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from customgen.cli import main  # noqa: E402
from customgen.errors import Notice, UserError  # noqa: E402
from customgen.inference import read_settings  # noqa: E402
from tests.artifact_fixtures import content_image, make_library  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).parent / "_artifacts"


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_styles")
    make_library(root)
    return root


@pytest.fixture(scope="module")
def app(lib):
    from customgen.demo import create_app

    app = create_app(model="tiny", styles_dir=lib)
    yield app
    app.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_cli_binds_localhost_without_share_by_default(lib, monkeypatch):
    import gradio as gr

    seen = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: seen.append(kw))
    assert main(["demo", "--model", "tiny", "--styles", str(lib)]) == 0
    assert seen[0]["server_name"] == "127.0.0.1" and seen[0]["share"] is False and seen[0]["max_file_size"]
    with pytest.warns(Notice, match="anyone with the link"):
        assert main(["demo", "--model", "tiny", "--styles", str(lib), "--share", "--port", "7861"]) == 0
    assert seen[1]["share"] is True and seen[1]["server_port"] == 7861


def test_demo_cli_missing_styles_folder_exits_2(tmp_path, capsys):
    assert main(["demo", "--model", "tiny", "--styles", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not a folder" in err[0]


def test_handler_errors_become_messages_not_tracebacks():
    import gradio as gr

    from customgen.demo import _ui

    def bad_input():
        raise UserError("upload a content image first")

    def crash():
        raise ZeroDivisionError("boom")
    with pytest.raises(gr.Error, match="upload a content image first"):
        _ui(bad_input)()
    with pytest.raises(gr.Error, match="unexpected failure: ZeroDivisionError: boom"):
        _ui(crash)()


def test_stylize_handler_with_a_painted_mask_and_pixel_limit(app, tmp_path):
    import gradio as gr

    from customgen.demo import _ui, editor_mask, stylize_handler

    state = app.customgen_state
    src = tmp_path / "c.png"
    content_image(7).save(src)
    layer = np.zeros((64, 80, 4), np.uint8)
    layer[16:48, 20:60] = (255, 255, 255, 255)  # a painted rectangle
    value = {"background": None, "layers": [layer], "composite": None}
    assert editor_mask({"layers": [np.zeros((64, 80, 4), np.uint8)]}) is None
    path, download, settings = stylize_handler(state, str(src), "lora_a", None, "auto", value, 0.8, 10, 3, "none")
    out, original = np.asarray(Image.open(path)), np.asarray(Image.open(src))
    assert path == download and settings["mask"] is True and settings["styles"][0]["name"] == "lora_a"
    assert np.array_equal(out[:8, :8], original[:8, :8]) and not np.array_equal(out[28:36, 36:44], original[28:36, 36:44])
    state.max_pixels = 1000
    try:
        with pytest.raises(gr.Error, match="too_large"):
            _ui(stylize_handler)(state, str(src), "lora_a", None, "auto", None, 0.5, 10, 3, "none")
    finally:
        from customgen.demo import MAX_PIXELS
        state.max_pixels = MAX_PIXELS


def test_mask_background_follows_the_content_without_raising(tmp_path):
    """The content → mask-editor sync gets Gradio's raw upload payload: a photo becomes the editor's background;
    a non-image, an empty file or one over the pixel cap leaves the editor empty and raises nothing (the Stylize
    click reports it, once)."""
    from customgen.demo import mask_background

    photo, fake, empty = tmp_path / "p.png", tmp_path / "fake.png", tmp_path / "empty.png"
    content_image(3, (40, 30)).save(photo)
    fake.write_text("not an image")
    empty.write_bytes(b"")
    payload = lambda path: {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}  # noqa: E731
    assert mask_background(payload(photo), 10_000) == {"background": str(photo), "layers": [], "composite": str(photo)}
    assert mask_background(payload(photo), 40 * 30 - 1) is None  # over the cap: the browser never decodes it
    assert mask_background(payload(fake), 10_000) is None and mask_background(payload(empty), 10_000) is None
    assert mask_background(None, 10_000) is None


def test_styles_table_names_each_kind(app):
    """The styles tab's table: one row per style with its method and kind as the manifests write them."""
    rows = {r[0]: r for r in app.customgen_state.table()}
    assert rows["lora_a"][1:3] == ["lora_style", "lora"] and rows["ti"][2] == "textual_inversion"
    assert rows["dreambooth"][2] == "dreambooth" and all(isinstance(cell, str) for r in rows.values() for cell in r)


def test_generate_handler_batch_with_a_subject(app):
    from customgen.demo import generate_handler

    paths, downloads = generate_handler(app.customgen_state, "", "", "subject", 1.0, 5, 7.5, 4, 2)
    assert paths == downloads and len(paths) == 2
    settings = [read_settings(p) for p in paths]
    assert [s["batch_index"] for s in settings] == [0, 1] and settings[0]["prompt"] == "a photo of sks person"
    assert settings[0]["seed"] == 4 and settings[0]["styles"][0]["method"] == "dreambooth_lora_subject"


TOAST_TEXT = '[data-testid="toast-text"], .toast-text'  # Gradio 6 marks a toast's message with a test id, 5.x a class


def error_toasts(page) -> list[list[str]]:
    """The error toasts on the page, each as its message lines (Gradio 6 groups repeats into one toast with a
    count badge "(N)" and one toast-text per repeat; Gradio 5 shows one toast per message)."""
    toasts = page.locator('[data-testid="toast-body"].error')
    lines = []
    for i in range(toasts.count()):
        toast = toasts.nth(i)
        count = toast.locator(".toast-count")  # Gradio 6: "(N)" when N messages share the toast
        repeats = [count.inner_text()] if count.count() else []
        lines.append([t.inner_text().strip() for t in toast.locator(TOAST_TEXT).all()] + repeats)
    return lines


def bad_upload_shows_one_error_line(page, tmp_path: Path) -> None:
    """After a real stylization: a text file named fake.png uploaded as content, then Stylize, is one error toast
    with one line (the upload itself shows nothing; the click shows the error once)."""
    for close in page.locator('[data-testid="toast-close"]').all():  # earlier messages out of the way
        close.click()
    page.locator('[data-testid="toast-body"]').first.wait_for(state="detached", timeout=10_000)
    fake = tmp_path / "fake.png"
    fake.write_text("this is a text file, not a PNG\n")
    with page.expect_request("**/queue/join*"):  # the upload's change event reaches the server
        page.locator("#content input[type=file]").set_input_files(str(fake))
    page.wait_for_timeout(2_000)  # what that event would show, it shows by now
    assert error_toasts(page) == []
    page.locator("#stylize").click()
    message = "fake.png is not an image: upload a PNG, JPEG or WebP photo."
    page.locator(TOAST_TEXT, has_text=message).first.wait_for(timeout=20_000)
    page.wait_for_timeout(2_000)  # a second copy of the error would have arrived by now
    page.screenshot(path=str(ARTIFACTS / "demo_bad_upload.png"), full_page=True)
    assert error_toasts(page) == [[message]]


@pytest.mark.browser
def test_browser_upload_stylize_download(app, tmp_path):
    """Upload, stylize with a library style, download the PNG with its settings; then a bad upload (one error)."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    from customgen.demo import launch

    port = free_port()
    launch(app, port=port, prevent_thread_lock=True)
    src = tmp_path / "photo.png"
    content_image(8, (96, 72)).save(src)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(accept_downloads=True)
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#stylize").click()  # nothing uploaded yet: a readable message, not a traceback
            page.get_by_text("upload a content image first").first.wait_for(timeout=20_000)
            page.locator("#content input[type=file]").set_input_files(str(src))
            page.locator("#content img").wait_for(timeout=20_000)
            page.locator("#style input").click()
            page.get_by_role("option", name="lora_a", exact=True).click()
            page.locator("#stylize").click()
            page.locator("#result img").wait_for(timeout=60_000)
            page.locator("#download a[download]").wait_for(timeout=20_000)
            with page.expect_download() as download:
                page.locator("#download a[download]").first.click()
            saved = tmp_path / "downloaded.png"
            download.value.save_as(saved)
            page.screenshot(path=str(ARTIFACTS / "demo_stylize.png"), full_page=True)
            bad_upload_shows_one_error_line(page, tmp_path)
        finally:
            browser.close()
            app.close()
    settings = read_settings(saved)
    assert Image.open(saved).size == (96, 72)
    assert settings["styles"][0]["name"] == "lora_a" and settings["model"] == "tiny" and settings["content"] == "photo.png"
    assert (ARTIFACTS / "demo_stylize.png").stat().st_size > 10_000
