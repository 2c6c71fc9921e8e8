"""Make the README's screenshots of `faceindex serve` (docs/serve_people.png, docs/serve_person.png).

Run: ``python docs/screenshots.py`` (needs /usr/bin/chromium and playwright, as the browser test does). The bundled
sample photos are indexed into a temporary folder, clustered, two persons named through the CLI, and the People
page and one Person page (with a merge search) captured by headless Chromium, then reduced to a 64-colour palette
to keep them small.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--hide-scrollbars"]


def faceindex(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "indexer", *args], check=True, capture_output=True, text=True,
                          cwd=REPO).stdout


def person_of(index: Path, path_end: str) -> int:
    for row in json.loads(faceindex("people", "list", "--index", str(index), "--json")):
        shown = json.loads(faceindex("people", "show", str(row["id"]), "--index", str(index), "--json"))
        if any(f["path"].endswith(path_end) for f in shown["faces"]):
            return row["id"]
    raise SystemExit(f"no person holds {path_end}")


def shoot(page, url: str, out: Path, height: int) -> None:
    page.set_viewport_size({"width": 1000, "height": height})
    page.goto(url)
    page.wait_for_load_state("networkidle")
    page.screenshot(path=str(out))
    Image.open(out).convert("RGB").quantize(64).save(out, optimize=True)
    print(f"{out}: {out.stat().st_size // 1024} KiB")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "index"
        faceindex("ingest", "--index", str(index), str(REPO / "samples"))
        faceindex("cluster", "--index", str(index))
        obama = person_of(index, "obama/obama1.jpg")
        faceindex("people", "name", str(obama), "Barack Obama", "--index", str(index))
        faceindex("people", "name", str(person_of(index, "biden/biden.jpg")), "Joe Biden", "--index", str(index))
        server = subprocess.Popen([sys.executable, "-m", "indexer", "serve", "--index", str(index), "--port", "0"],
                                  cwd=REPO, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not (index / "serve.json").exists():
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("faceindex serve did not start")
                time.sleep(0.1)
            base = json.loads((index / "serve.json").read_text())["url"].rstrip("/")
            with sync_playwright() as p:
                context = p.chromium.launch_persistent_context(
                    str(Path(tmp) / "profile"), executable_path="/usr/bin/chromium", headless=True, args=FLAGS)
                page = context.new_page()
                shoot(page, f"{base}/people", REPO / "docs" / "serve_people.png", 420)
                shoot(page, f"{base}/people/{obama}?merge_q=jo", REPO / "docs" / "serve_person.png", 600)
                context.close()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
