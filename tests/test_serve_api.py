"""`faceindex serve`'s JSON API and its defences, against the real server (a subprocess on 127.0.0.1) over an index
of the bundled sample photos, plus one photo whose name is not UTF-8 and holds markup.

The API must answer as the CLI's --json does (same library calls), its edits must be the user's word that a
recluster keeps, and no other web site, oversized or non-image upload, or URL may reach past it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageOps

from indexer.web.discovery import query_server, write_serve_file
from tests.conftest import SAMPLES, cli, cli_json
from tests.served import running_server

ODD_NAME = os.fsdecode(b"caf\xe9 <i>.jpg")  # Latin-1 bytes (not UTF-8) and markup, in one file name
ODD_FAILED = os.fsdecode(b"d\xe9j\xe0 vu.jpg")  # the same, for a file that is not an image
HOSTILE = "<script>alert(1)</script>"
EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def index(sample_index, tmp_path_factory) -> Path:
    """The samples, plus a byte-identical copy of biden2.jpg under ODD_NAME (its face is reused, no model runs),
    clustered."""
    root = tmp_path_factory.mktemp("serve-api")
    index = root / "index"
    shutil.copytree(sample_index, index)
    odd = root / "odd"
    odd.mkdir()
    shutil.copy(SAMPLES / "photos" / "biden" / "biden2.jpg", odd / ODD_NAME)
    (odd / ODD_FAILED).write_bytes(b"not an image")  # recorded as failed: the Status page lists its name
    cli("ingest", "--index", str(index), str(odd))
    cli("cluster", "--index", str(index))
    return index


@pytest.fixture(scope="module")
def server(index, tmp_path_factory):
    with running_server(index, "--max-upload-mb", "1", log_dir=tmp_path_factory.mktemp("serve-log")) as info:
        yield info


@pytest.fixture
def api(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server['port']}", timeout=300) as client:
        yield client


def person_with(api: httpx.Client, path_end: str) -> int:
    """The person holding the face of the photo whose path ends with ``path_end``."""
    for row in api.get("/api/people").json():
        if any(f["path"].endswith(path_end) for f in api.get(f"/api/people/{row['id']}").json()["faces"]):
            return row["id"]
    raise AssertionError(f"no person has a face from {path_end}")


def face_of(api: httpx.Client, person: int, path_end: str) -> int:
    return next(f["face_id"] for f in api.get(f"/api/people/{person}").json()["faces"] if f["path"].endswith(path_end))


def test_reads_answer_as_the_cli_json_does(api, index):
    people = api.get("/api/people").json()
    assert people == cli_json("people", "list", "--index", str(index))
    assert all(isinstance(row["face"], int) for row in people), "each person names its picture"
    first = people[0]["id"]
    assert api.get(f"/api/people/{first}").json() == cli_json("people", "show", str(first), "--index", str(index))
    assert api.get("/api/people", params={"offset": 1, "limit": 2}).json() == people[1:3]
    status = api.get("/api/status").json()
    assert status["faces"] == cli_json("status", "--index", str(index))["faces"]
    assert {"files", "index", "clusters", "daemon", "failures"} <= set(status)
    assert api.get("/api/people/99999").status_code == 404
    assert api.get("/api/people/99999").json()["error"].startswith("no person 99999")


def test_edits_are_the_users_word_and_survive_a_recluster(api, index):
    kit, rose = person_with(api, "kit_harington/john1.jpeg"), person_with(api, "rose_leslie/img2.jpg")
    obama = person_with(api, "obama/obama1.jpg")
    assert len({kit, rose, obama}) == 3
    small = face_of(api, obama, "obama/obama_small.jpg")
    poster = face_of(api, obama, "group/obama_and_biden.jpg")

    assert api.post(f"/api/people/{obama}/name", json={"name": "Barack Obama"}).json()["name"] == "Barack Obama"
    merged = api.post(f"/api/people/{kit}/merge", json={"other": rose}).json()
    assert (merged["id"], merged["merged"]) == (kit, rose)
    assert api.post(f"/api/people/{obama}/remove", json={"faces": [small]}).json()["removed"] == [small]
    assert api.post("/api/faces/ignore", json={"faces": [poster]}).json()["ignored"] == [poster]
    assert [e["op"] for e in api.get("/api/history").json()][-4:] == ["name", "merge", "remove", "ignore"]
    undone = api.post("/api/undo").json()["undone"]
    assert undone["op"] == "ignore"
    assert api.post("/api/faces/ignore", json={"faces": [poster]}).status_code == 200

    cli("cluster", "--index", str(index))  # another process reclusters: the server must see it and the word holds
    people = {r["id"]: r for r in api.get("/api/people").json()}
    assert people[obama]["name"] == "Barack Obama"
    assert rose not in people
    kit_faces = {f["path"].rsplit("/", 2)[-2] for f in api.get(f"/api/people/{kit}").json()["faces"]}
    assert {"kit_harington", "rose_leslie"} <= kit_faces
    obama_faces = {f["face_id"] for f in api.get(f"/api/people/{obama}").json()["faces"]}
    assert small not in obama_faces and poster not in obama_faces
    assert all(poster not in {f["face_id"] for f in api.get(f"/api/people/{p}").json()["faces"]} for p in people)


def test_bad_edit_requests_are_refused_and_change_nothing(api):
    before = api.get("/api/people").json()
    person = before[0]["id"]
    assert api.post(f"/api/people/{person}/name", json={"nom": "x"}).status_code == 400
    assert api.post(f"/api/people/{person}/remove", json={"faces": []}).status_code == 400
    assert api.post(f"/api/people/{person}/remove", json={"faces": ["x"]}).status_code == 400
    assert api.post(f"/api/people/{person}/merge", json={"other": person}).status_code == 409  # itself
    assert api.post(f"/api/people/{person}/name", content=b'{"name": "x"}',
                    headers={"content-type": "text/plain"}).status_code == 415
    assert api.get("/api/people").json() == before


def flipped(src: Path, out: Path) -> Path:
    """A mirrored re-encode: the same person, but not a photo the index holds (not byte-identical, other pixels)."""
    ImageOps.mirror(Image.open(src).convert("RGB")).save(out, quality=92)
    return out


def test_search_finds_the_person_and_query_uses_the_server(api, index, tmp_path):
    biden = person_with(api, "biden/biden.jpg")
    photo = flipped(SAMPLES / "photos" / "biden" / "biden.jpg", tmp_path / "flipped.jpg")
    with photo.open("rb") as fh:
        answer = api.post("/api/search", files={"image": ("flipped.jpg", fh, "image/jpeg")}, data={"k": "3"})
    assert answer.status_code == 200, answer.text
    (face,) = answer.json()
    assert len(face["matches"]) == 3 and face["matches"][0]["cluster"] == biden

    proc = cli("query", str(photo), "-k", "3", "--index", str(index), "--json")
    assert "answered by faceindex serve" in proc.stderr
    assert json.loads(proc.stdout) == answer.json()


def test_uploads_must_be_images_under_the_size_limit(api, tmp_path):
    assert api.post("/api/search", files={"image": ("a.jpg", b"not an image at all", "image/jpeg")}).status_code == 415
    assert api.post("/api/search", files={"image": ("a.txt", b"\xff\xd8\xff", "text/plain")}).status_code == 415
    assert api.post("/api/search", data={"k": "3"}).status_code == 400
    big = b"\xff\xd8\xff" + os.urandom(2 << 20)  # the server was started with --max-upload-mb 1
    assert api.post("/api/search", files={"image": ("big.jpg", big, "image/jpeg")}).status_code == 413
    broken = b"\xff\xd8\xff\xe0" + b"\0" * 100  # looks like a JPEG, is none: the library's ImageError, as a 400
    answer = api.post("/api/search", files={"image": ("b.jpg", broken, "image/jpeg")})
    assert answer.status_code == 400 and answer.json()["error"]


# ---------------------------------------------------------------------------------------------- security
def test_cross_origin_requests_that_change_something_get_403_and_change_nothing(api, server):
    person = api.get("/api/people").json()[0]
    port = server["port"]
    refused = [
        api.post(f"/api/people/{person['id']}/name", json={"name": "pwned"}, headers={"origin": EVIL}),
        api.post(f"/api/people/{person['id']}/name", json={"name": "pwned"}, headers={"origin": "null"}),
        api.post(f"/api/people/{person['id']}/name", json={"name": "pwned"}, headers={"sec-fetch-site": "cross-site"}),
        # a form on another site posting to the page's own form handler
        api.post(f"/people/{person['id']}/name", data={"name": "pwned"}, headers={"origin": EVIL}),
        # same origin but without the page's token (a forged form, or one from a stale page)
        api.post(f"/people/{person['id']}/name", data={"name": "pwned"},
                 headers={"origin": f"http://127.0.0.1:{port}"}),
        api.post("/api/undo", headers={"origin": f"http://127.0.0.1.evil.example:{port}"}),
        # DNS rebinding: a hostile name resolving to 127.0.0.1 is same-origin with itself, but its Host is wrong
        api.post(f"/api/people/{person['id']}/name", json={"name": "pwned"},
                 headers={"host": f"evil.example:{port}", "origin": f"http://evil.example:{port}"}),
        api.get("/api/people", headers={"host": f"evil.example:{port}"}),
    ]
    assert [r.status_code for r in refused] == [403] * len(refused)
    assert api.get(f"/api/people/{person['id']}").json()["name"] == person["name"]
    assert "pwned" not in api.get("/people").text


def test_same_origin_form_with_the_token_edits(api, server):
    person = api.get("/api/people").json()[-1]["id"]
    page = api.get(f"/people/{person}").text
    token = page.split('name="token" value="', 1)[1].split('"', 1)[0]
    origin = f"http://127.0.0.1:{server['port']}"
    done = api.post(f"/people/{person}/name", data={"name": "Via a form", "token": token}, headers={"origin": origin})
    assert done.status_code == 303 and done.headers["location"] == f"/people/{person}"
    assert api.get(f"/api/people/{person}").json()["name"] == "Via a form"
    api.post("/api/undo")


def test_names_and_file_names_render_as_text(api):
    person = api.get("/api/people").json()[0]["id"]
    api.post(f"/api/people/{person}/name", json={"name": HOSTILE})
    try:
        for page in (api.get("/people"), api.get(f"/people/{person}")):
            assert page.status_code == 200
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and HOSTILE not in page.text
            assert "script-src 'self'" in page.headers["content-security-policy"]
    finally:
        api.post("/api/undo")
    holder = person_with(api, ODD_NAME)
    page = api.get(f"/people/{holder}")
    assert page.status_code == 200 and "caf\ufffd &lt;i&gt;.jpg" in page.text
    # JSON keeps the name losslessly, as the CLI's --json: the undecodable byte as a surrogate escape
    paths = [f["path"] for f in api.get(f"/api/people/{holder}").json()["faces"]]
    assert any(os.fsencode(p).endswith(b"caf\xe9 <i>.jpg") for p in paths)
    face = face_of(api, holder, ODD_NAME)
    photo = api.get(f"/photo/{face}")
    assert photo.status_code == 200 and "caf\ufffd &lt;i&gt;.jpg" in photo.text
    assert api.get(f"/photos/{face}").content == (SAMPLES / "photos" / "biden" / "biden2.jpg").read_bytes()
    status = api.get("/status")
    assert status.status_code == 200 and "d\ufffdj\ufffd vu.jpg" in status.text
    token = page.text.split('name="token" value="', 1)[1].split('"', 1)[0]
    with (SAMPLES / "photos" / "biden" / "biden2.jpg").open("rb") as fh:
        found = api.post("/search", files={"image": ("biden2.jpg", fh, "image/jpeg")},
                         data={"k": "30", "token": token}, headers={"origin": str(api.base_url).rstrip("/")})
    assert found.status_code == 200 and f'href="/photo/{face}"' in found.text  # the odd-named copy: similarity 1


def test_only_files_recorded_in_the_store_are_served(api):
    face = api.get("/api/people").json()[0]["face"]
    assert api.get(f"/thumbs/{face}.jpg").headers["content-type"] == "image/jpeg"
    assert api.get(f"/photos/{face}").headers["content-type"].startswith("image/")
    for url in ("/photos/999999", "/thumbs/999999.jpg", "/api/photos/999999", "/photo/999999",
                "/photos/..%2F..%2F..%2Fetc%2Fpasswd", "/photos/%2Fetc%2Fpasswd", "/static/..%2F..%2Fconfig.toml",
                "/static/../../indexer/library.py", "/thumbs/-1.jpg"):
        answer = api.get(url)
        assert answer.status_code == 404, url
        assert "root:" not in answer.text and "FaceIndex" not in answer.text


# ---------------------------------------------------------------------------------------------- discovery
def test_query_falls_back_at_once_without_a_live_server(tmp_path):
    assert query_server(tmp_path, __file__, 3, None) is None  # no serve.json
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: a connection is refused
        write_serve_file(tmp_path, "127.0.0.1", port)  # this test's own (live) pid
        assert query_server(tmp_path, __file__, 3, None) is None
    (tmp_path / "serve.json").write_text('{"pid": 999999999, "host": "127.0.0.1", "port": 1}')
    assert query_server(tmp_path, __file__, 3, None) is None
    (tmp_path / "serve.json").write_text("{broken")
    assert query_server(tmp_path, __file__, 3, None) is None
