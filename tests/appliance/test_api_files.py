"""A case's files over real HTTP: listed when they exist and are whole, served with their media types."""

import httpx

from appliance.terms import CaseFile
from tests.appliance.conftest import finished_case


def test_case_files_are_served_with_their_media_types(api, settings, ov_engine):
    import json

    from appliance.offline.triage import triage_path
    from tests.conftest import DEMO_CASE

    store, url = api
    finished_case(store, "DEMO-1")
    triage_path(ov_engine, DEMO_CASE, out_dir=settings.cases_dir / "DEMO-1")
    folder = settings.cases_dir / "DEMO-1"
    with httpx.Client(base_url=url, timeout=30) as c:
        # the record lists exactly the case's files on disk (all of them: the demo case has tissue), each
        # with a URL that serves those bytes with the media type the record gave
        listed = c.get("/cases/DEMO-1").json()["files"]
        assert {f["name"] for f in listed} == {p.name for p in folder.iterdir() if p.is_file()} == set(CaseFile)
        for f in listed:
            got = c.get(f["url"])
            assert got.status_code == 200, f
            assert got.headers["content-type"] == f["media_type"] == CaseFile(f["name"]).media_type
            assert got.content == (folder / f["name"]).read_bytes() and len(got.content) == f["bytes"]
        png = c.get("/cases/DEMO-1/overlay.png")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
        geo = c.get("/cases/DEMO-1/regions.geojson")
        assert geo.headers["content-type"] == "application/geo+json"
        assert json.loads(geo.content)["type"] == "FeatureCollection"
        tif = c.get("/cases/DEMO-1/case.ome.tif")
        assert tif.headers["content-type"] == "image/tiff" and tif.content[:4] in (b"II*\x00", b"II+\x00")
        assert c.get("/cases/C-9/overlay.png").status_code == 404
        assert c.get("/cases/DEMO-1/secret.txt").status_code == 404


def test_a_case_lists_the_files_on_disk_with_urls_that_serve_them(api, settings):
    """Only complete files with a case-file name are listed: not a temporary name being written, not a stray
    file, not a folder; a new file shows on the next read and a removed one goes."""
    store, url = api
    finished_case(store, "C-1")
    folder = settings.cases_dir / "C-1"
    folder.mkdir(parents=True)
    written = {CaseFile.SUMMARY: b'{"case_id": "C-1"}', CaseFile.OVERLAY: b"\x89PNG\r\n\x1a\n-overlay",
               CaseFile.REGIONS: b'{"type": "FeatureCollection", "features": []}'}
    for name, data in written.items():
        (folder / name).write_bytes(data)
    (folder / f".{CaseFile.HEATMAP}.tmp").write_bytes(b"half a file")  # the writer's temporary name
    (folder / "notes.txt").write_text("not a case file")
    (folder / CaseFile.THUMBNAIL).mkdir()  # a folder with a file's name is not that file
    (folder / ".work").mkdir()
    with httpx.Client(base_url=url, timeout=10) as c:
        record = c.get("/cases/C-1").json()
        order = list(CaseFile)
        expected = sorted(written, key=order.index)  # in CaseFile order, whatever the folder's order
        assert [f["name"] for f in record["files"]] == expected
        assert c.get("/cases").json()["cases"][0]["files"] == record["files"]  # the list carries them too
        for f in record["files"]:
            assert f["url"] == f"/cases/C-1/{f['name']}"
            assert f["media_type"] == CaseFile(f["name"]).media_type and f["bytes"] == len(written[f["name"]])
            got = c.get(f["url"])
            assert got.status_code == 200 and got.content == written[f["name"]]
            assert got.headers["content-type"] == f["media_type"]
        # what is not listed is not there to fetch
        assert c.get(f"/cases/C-1/{CaseFile.HEATMAP}").status_code == 404
        assert c.get(f"/cases/C-1/{CaseFile.THUMBNAIL}").status_code == 404
        (folder / CaseFile.TOP_PATCHES).write_bytes(b"\x89PNG\r\n\x1a\n-top")
        (folder / CaseFile.OVERLAY).unlink()  # as retention does
        after = [f["name"] for f in c.get("/cases/C-1").json()["files"]]
        assert after == [CaseFile.SUMMARY, CaseFile.TOP_PATCHES, CaseFile.REGIONS]


def test_a_case_with_no_files_yet_lists_none(api, settings):
    store, url = api
    store.case_started("RUN-1", specimen_id="S", tiles_expected=3)  # receiving: nothing written yet
    finished_case(store, "C-1")  # called, its files not written yet (the call is stored before them)
    (settings.cases_dir / "C-1").mkdir(parents=True)  # the folder alone, as when writing has begun
    with httpx.Client(base_url=url, timeout=10) as c:
        for case_id in ("RUN-1", "C-1"):
            record = c.get(f"/cases/{case_id}")
            assert record.status_code == 200 and record.json()["files"] == [], case_id
        assert {x["id"]: x["files"] for x in c.get("/cases").json()["cases"]} == {"RUN-1": [], "C-1": []}


def test_a_file_being_written_is_not_listed_until_it_is_complete(api, settings):
    """The pipeline's writer (temporary name, then rename) seen through the API: while the bytes are going
    in, the record does not list the file and its URL is a 404; once renamed, it is listed whole."""
    from appliance.pipeline.outputs import _replace_into

    store, url = api
    finished_case(store, "C-1")
    folder = settings.cases_dir / "C-1"
    folder.mkdir(parents=True)
    data = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64
    seen_while_writing = {}
    with httpx.Client(base_url=url, timeout=10) as c:
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data[:100])
                f.flush()
                seen_while_writing["files"] = c.get("/cases/C-1").json()["files"]
                seen_while_writing["get"] = c.get(f"/cases/C-1/{CaseFile.OVERLAY}").status_code
                f.write(data[100:])

        _replace_into(folder / CaseFile.OVERLAY, write)
        done = c.get("/cases/C-1").json()["files"]
        got = c.get(f"/cases/C-1/{CaseFile.OVERLAY}")
    assert seen_while_writing == {"files": [], "get": 404}
    assert [(f["name"], f["bytes"]) for f in done] == [(CaseFile.OVERLAY, len(data))]
    assert got.status_code == 200 and got.content == data
