"""`faceindex serve` in a real browser: headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) over the
bundled sample photos. Name a person from the People page, rename one on its page, merge two (found by name),
remove a face, search by uploading a photo; then `faceindex cluster` runs in another process and every edit is
still there after a reload. The pages must also load without a script or style the CSP refuses, and no dialog.
"""

from __future__ import annotations

import httpx
import pytest
from PIL import Image, ImageOps

from tests.browser import chromium_path
from tests.conftest import SAMPLES, cli
from tests.served import running_server

playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extras have it)")
pytestmark = pytest.mark.skipif(chromium_path() is None, reason="no /usr/bin/chromium: apt-get install -y chromium")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
TIMEOUT_MS = 120_000  # a search waits for the server's models on a busy machine; a hang still fails


@pytest.fixture
def served(copy_index, tmp_path):
    cli("cluster", "--index", str(copy_index))
    with running_server(copy_index, log_dir=tmp_path) as info:
        yield copy_index, f"http://127.0.0.1:{info['port']}"


@pytest.fixture
def page(tmp_path):
    """A page in a fresh browser profile; console errors (a CSP refusal is one) and dialogs are collected."""
    with playwright.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium_path(), headless=True, args=FLAGS)
        try:
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.problems = []
            page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
            page.on("pageerror", lambda e: page.problems.append(str(e)))
            page.on("dialog", lambda d: (page.problems.append(f"dialog: {d.message}"), d.dismiss()))
            yield page
        finally:
            context.close()


def person_with(base: str, path_end: str) -> int:
    with httpx.Client(base_url=base, timeout=60) as api:
        for row in api.get("/api/people").json():
            faces = api.get(f"/api/people/{row['id']}").json()["faces"]
            if any(f["path"].endswith(path_end) for f in faces):
                return row["id"]
    raise AssertionError(f"no person has a face from {path_end}")


def face_id(base: str, person: int, path_end: str) -> int:
    faces = httpx.get(f"{base}/api/people/{person}", timeout=60).json()["faces"]
    return next(f["face_id"] for f in faces if f["path"].endswith(path_end))


def submit(page, selector: str) -> None:
    """Click a submit button and wait for the page it leads to (edits answer with a redirect)."""
    with page.expect_navigation():
        page.click(selector)


def test_see_name_merge_remove_search_and_every_edit_survives_a_recluster(served, page, tmp_path):
    index, base = served
    expect = playwright.expect
    kit, rose = person_with(base, "kit_harington/john1.jpeg"), person_with(base, "rose_leslie/img2.jpg")
    obama = person_with(base, "obama/obama1.jpg")
    small = face_id(base, obama, "obama/obama_small.jpg")
    persons = len(httpx.get(f"{base}/api/people", timeout=60).json())

    # People: every person with a picture; an unnamed one is named right there.
    page.goto(f"{base}/people")
    expect(page.locator("li.card")).to_have_count(persons)
    assert page.locator("li.card img").count() == persons
    card = page.locator(f"li.card[data-person='{kit}']")
    card.locator("input[name=name]").fill("Kit Harington")
    submit(page, f"li.card[data-person='{kit}'] button")
    expect(page.locator(f"li.card[data-person='{kit}'] .name")).to_have_text("Kit Harington")
    expect(page.locator("li.card").first).to_have_attribute("data-person", str(kit))  # named first

    # Person: rename.
    page.goto(f"{base}/people/{obama}")
    page.fill("#rename input[name=name]", "Barack Obama")
    submit(page, "#rename button")
    expect(page.locator("#person-name")).to_have_text("Barack Obama")

    # Merge Rose into Kit, found by name.
    page.goto(f"{base}/people/{rose}")
    page.fill("#merge-search input[name=merge_q]", "kit")
    submit(page, "#merge-search button")
    submit(page, "button:has-text('Merge into Kit Harington')")
    assert page.url.endswith(f"/people/{kit}")
    expect(page.locator(".flash")).to_contain_text(f"merged #{rose} into #{kit}")
    expect(page.locator(".photo-link", has_text="img2.jpg")).to_have_count(1)  # rose_leslie/img2.jpg

    # Remove a face: select it, "Not this person".
    page.goto(f"{base}/people/{obama}")
    page.check(f"input[name=face][value='{small}']")
    submit(page, "button[value=remove]")
    expect(page.locator(f"input[name=face][value='{small}']")).to_have_count(0)

    # Photo: the group photo with a box per face, Obama's linked to his page.
    group = face_id(base, obama, "group/obama_and_biden.jpg")
    in_photo = httpx.get(f"{base}/api/photos/{group}", timeout=60).json()["faces"]
    page.goto(f"{base}/photo/{group}")
    expect(page.locator("figure.photo svg rect")).to_have_count(len(in_photo))
    assert len(in_photo) >= 2
    expect(page.locator(f"figure.photo svg a[href='/people/{obama}']")).to_have_count(1)

    # Search: a mirrored copy of an Obama photo (not in the index) finds him first.
    query = tmp_path / "mirrored.jpg"
    ImageOps.mirror(Image.open(SAMPLES / "photos" / "obama" / "obama1.jpg").convert("RGB")).save(query, quality=92)
    page.goto(f"{base}/search")
    page.set_input_files("input[type=file]", str(query))
    submit(page, "#search-form button[type=submit]")
    expect(page.locator("a.best").first).to_have_text("Barack Obama")

    # Another process reclusters; a reload shows every edit still there.
    cli("cluster", "--index", str(index))
    check_edits_kept(page, base, kit=kit, rose=rose, obama=obama, small=small, persons=persons - 1)
    assert page.problems == [], page.problems


def check_edits_kept(page, base: str, *, kit: int, rose: int, obama: int, small: int, persons: int) -> None:
    expect = playwright.expect
    page.goto(f"{base}/people")
    names = page.locator("li.card .name").all_text_contents()
    assert names[:2] == ["Kit Harington", "Barack Obama"] and len(names) == persons, names
    page.goto(f"{base}/people/{obama}")
    expect(page.locator("#person-name")).to_have_text("Barack Obama")
    expect(page.locator(f"input[name=face][value='{small}']")).to_have_count(0)
    page.goto(f"{base}/people/{kit}")
    expect(page.locator(".photo-link", has_text="img2.jpg")).to_have_count(1)
    assert httpx.get(f"{base}/people/{rose}", timeout=60).status_code == 404  # merged away
