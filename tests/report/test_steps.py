"""Each step's report (kfp Metrics + HTML, ``imgpipe show``) on outputs of the real steps.

The archive is generated here: three classes whose folder names are hostile (markup, quotes,
a terminal escape), plus members each step rejects (links, a path escape, truncated and
non-image files, a duplicate, a decompression bomb). download and clean run for real on
``file://`` under ``tmp_path``; the resize and train reports need Ray (and torch) and are
marked ``ray``: run them inside ``scripts/in-loopback-netns``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from xml.etree import ElementTree

import pytest
from PIL import Image

from imgpipe import contract, storage
from imgpipe.clean.config import CleanConfig
from imgpipe.data.images import ImageRejected, thumbnail
from imgpipe.phases import PhaseLog
from imgpipe.report import html as htmlpage
from imgpipe.report import output
from imgpipe.report import steps as step_report
from imgpipe.steps.clean import clean
from imgpipe.steps.download import DownloadConfig, download
from tests import imagefactory as f

# Class names are folder names: whoever made the archive chose them.
HOSTILE = ["<script>alert(1)<", "<img src=x onerror=alert(1)>", "a&b \"c\" 'd' red"]
# A class name no label file can carry: its images are clean's bad_label rejects, and its path is shown escaped.
UNLABELLABLE = "\x1b[31mred"
PER_CLASS = 6
MAX_PAGE = 2 << 20
# What clean rejects: path -> (reason, bytes).
BAD = {
    f"{HOSTILE[0]}/truncated.jpg": ("truncated", f.truncated_jpeg(1)),
    f"{HOSTILE[1]}/page.jpg": ("not_an_image", f.html_as_jpg()),
    f"{HOSTILE[1]}/tiny.jpg": ("too_small", f.tiny_jpeg()),
    f"{HOSTILE[2]}/bomb.png": ("too_large", f.png_bomb(12000)),
}


def _tar(path: Path) -> Path:
    """The test archive: good images per hostile class, clean's rejects, download's rejects."""
    members = {f"{name}/{i}.jpg": f.jpeg(120 + 8 * i, 90 + 4 * c, seed=10 * c + i) for c, name in enumerate(HOSTILE) for i in range(PER_CLASS)}
    members.update({p: data for p, (_, data) in BAD.items()})
    members[f"{HOSTILE[0]}/copy.jpg"] = members[f"{HOSTILE[0]}/0.jpg"]  # a duplicate
    members.update({f"{UNLABELLABLE}/{i}.jpg": f.jpeg(100, 80, seed=900 + i) for i in range(2)})
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("escape-link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        up = tarfile.TarInfo("../outside.jpg")
        up.size = 3
        tar.addfile(up, io.BytesIO(b"abc"))
    return path


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """download and clean outputs of the real steps, and the archive's sha256."""
    root = tmp_path_factory.mktemp("step-report")
    archive = _tar(root / "hostile.tar.gz")
    store = "file://" + str(root / "store")
    dl = download([str(archive)], f"{store}/download", DownloadConfig(row_group_rows=8))
    cl = clean(dl.dest, f"{store}/clean", CleanConfig(workers=1, label_source="folder", split=(0.5, 0.25, 0.25), row_group_rows=8))
    return {"download": dl.dest, "clean": cl.dest, "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(), "root": str(root)}


def _assert_safe_page(page: str) -> None:
    """No markup from the data: every tag is one the report made."""
    assert len(page.encode()) < MAX_PAGE
    assert "<script" not in page.lower() and "onerror=alert(1)>" not in page
    assert all(tag.startswith("<img alt='") for tag in re.findall(r"<img[^>]*", page)), "only the report's own images"
    assert "\x1b" not in page, "control characters are shown as escapes"
    assert "&lt;script&gt;alert(1)&lt;" in page, "hostile names are shown, as text"


def test_download_report_counts_checksum_and_rejects(outputs):
    report = step_report.build_report(outputs["download"])
    manifest = contract.read_manifest(outputs["download"])
    m = report.metrics
    assert (m["inputs"], m["outputs"], m["rejected"]) == (manifest["inputs"], manifest["outputs"], manifest["rejected"])
    assert m["rejected_unsafe_member"] == 2 and m["sources"] == 1
    assert m["archive_bytes"] > 0 and m["bytes_extracted"] == manifest["extra"]["bytes_extracted"]
    page = report.html()
    _assert_safe_page(page)
    for title in ("Sources", "Rejects by reason", "Rejected", "Sample members"):
        assert f"<h2>{title}</h2>" in page
    assert outputs["sha256"] in page and outputs["sha256"] in report.text()
    assert "escape-link.jpg" in page and "unsafe_member" in report.text()
    assert Image.open(io.BytesIO(report.grid_png())).format == "PNG"


def test_clean_report_counts_histograms_thumbnails_and_rejects(outputs):
    report = step_report.build_report(outputs["clean"])
    manifest = contract.read_manifest(outputs["clean"])
    m = report.metrics
    assert m["outputs"] == manifest["outputs"] == 3 * PER_CLASS
    assert {k: v for k, v in m.items() if k.startswith("rejected_")} == {
        "rejected_bad_label": 2,
        "rejected_duplicate": 1,
        "rejected_not_an_image": 1,
        "rejected_too_large": 1,
        "rejected_too_small": 1,
        "rejected_truncated": 1,
    }
    assert m["classes"] == 3 and m["train_images"] + m["val_images"] + m["test_images"] == m["outputs"]
    chart = next(s for s in report.sections if isinstance(s, output.Chart))
    assert set(chart.series) == {"train", "val", "test"} and sorted(chart.categories) == sorted(HOSTILE)
    assert sum(map(sum, chart.series.values())) == m["outputs"]
    galleries = {s.title: s for s in report.sections if isinstance(s, output.Gallery)}
    per_class = galleries["Images per class"]
    assert {label for label, _ in per_class.rows} == set(HOSTILE)
    assert all(len(tiles) == 4 and all(t.picture is not None for t in tiles) for _, tiles in per_class.rows)
    rejected = {t.caption.split(":")[0]: t for _, tiles in galleries["Rejected images"].rows for t in tiles}
    assert set(rejected) == {"bad_label", "duplicate", "too_small"}, "what decodes is shown with its reason"
    assert all(t.picture is not None for t in rejected.values())
    note = galleries["Rejected images"].note
    assert "not decoded again: not_an_image, too_large, truncated" in note, "a bomb, or what clean could not decode"

    page = report.html()
    _assert_safe_page(page)
    for title in ("Rejects by reason", "Images per class and split", "Images per class", "Rejected images", "Sample rows"):
        assert f"<h2>{title}</h2>" in page
    # one chart of images per class and split, five of the quality measures (brightness ... aspect)
    assert page.count("<svg") == 6 and page.count("data:image/jpeg;base64,") >= 3 * 4 + 1


def test_text_is_aligned_and_inert_in_a_terminal(outputs):
    text = step_report.build_report(outputs["clean"]).text(max_rows=3)
    assert "\x1b" not in text and "\\x1b[31mred" in text, "control characters are shown escaped"
    lines = text.splitlines()
    header = lines.index("Rejects by reason") + 1
    assert lines[header].split() == ["reason", "count"] and set(lines[header + 1]) == {"-", " "}
    counts = lines[header + 2 : header + 5]
    assert len({len(line) for line in counts}) == 1, "numbers right-aligned in one column"
    assert re.search(r"\.\.\. \d+ more", text), "tables cut at max_rows say how much is left"


def test_reports_are_bounded_by_their_limits(outputs):
    limits = output.ReportLimits(per_class=1, classes=2, chart_classes=2, table_rows=2, rejects_shown=1, samples=1)
    report = step_report.build_report(outputs["clean"], limits)
    galleries = [s for s in report.sections if isinstance(s, output.Gallery)]
    assert [len(tiles) for g in galleries for _, tiles in g.rows] == [1, 1, 1]
    chart = next(s for s in report.sections if isinstance(s, output.Chart))
    assert len(chart.categories) == 2 and "largest" in chart.note
    assert all(len(s.rows) <= 2 for s in report.sections if isinstance(s, output.Table) and s.title != "Rejects by reason")
    starved = step_report.build_report(outputs["clean"], output.ReportLimits(read_bytes=1))
    assert all(not g.rows for g in starved.sections if isinstance(g, output.Gallery)), "nothing read past the budget"
    assert starved.metrics == report.metrics, "the counts come from the manifest, not from the sample"
    with pytest.raises(ValueError, match="thumb_side must be an integer >= 1"):
        output.ReportLimits(thumb_side=0)


def test_a_page_stays_small_with_many_classes_and_big_images(tmp_path):
    """45 classes of 1-megapixel photos: the page holds a bounded number of thumbnails, never the images."""
    from tests.helpers import write_download_output

    members = {f"images/c{c:03d}/{i}.jpg": f.jpeg(1200, 900, seed=c * 10 + i) for c in range(45) for i in range(5)}
    store = "file://" + str(tmp_path / "store")
    dl = write_download_output(f"{store}/download", members, row_group_rows=32)
    cl = clean(dl, f"{store}/clean", CleanConfig(workers=1, label_source="folder"))

    def thumbnails(report: output.OutputReport) -> list[output.Tile]:
        gallery = next(s for s in report.sections if isinstance(s, output.Gallery))
        return [t for _, tiles in gallery.rows for t in tiles]

    # One thumbnail per thumb_share (10) images: a thumbnail costs part of what cleaning the image did.
    assert len(thumbnails(step_report.build_report(cl.dest))) == 225 // 10
    # The most a page ever shows: classes (40) x per_class (4) thumbnails, still far below 2 MB.
    dense = step_report.build_report(cl.dest, output.ReportLimits(thumb_share=1, read_bytes=256 << 20))
    assert len(thumbnails(dense)) == 40 * 4 and all(max(t.picture.size) <= 80 for t in thumbnails(dense))
    assert 100 << 10 < len(dense.html().encode()) < MAX_PAGE


def test_the_cpu_image_builds_reports_without_matplotlib_torch_opencv_or_ray(outputs, tmp_path):
    # download and clean run in the cpu image, which has none of these (it is near its size budget).
    script = f"""
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("matplotlib", "torch", "torchvision", "cv2", "ray", "kornia", "albumentations", "rich"):
            raise ImportError(f"{{name}} is not installed in the cpu image")
sys.meta_path.insert(0, Refuse())
from imgpipe.stepio import artifacts as kfp_artifacts
from imgpipe.report import steps as step_report
from imgpipe.cli import main
for prefix in ({outputs["download"]!r}, {outputs["clean"]!r}):
    step_report.build_report(prefix).html()
    assert main(["show", prefix, "--grid", {str(tmp_path / "g.png")!r}]) == 0
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_an_uncommitted_prefix_is_refused(outputs, tmp_path):
    half = "file://" + str(tmp_path / "half")
    storage.write_bytes(f"{half}/{contract.MANIFEST}", json.dumps({"step": "clean"}).encode())
    with pytest.raises(contract.UncommittedOutputError, match="is not a committed step output"):
        step_report.build_report(half)
    storage.write_bytes(f"{half}/{contract.SUCCESS}", b"")
    storage.write_bytes(f"{half}/{contract.MANIFEST}", json.dumps({"step": "mystery"}).encode())
    with pytest.raises(ValueError, match="reports exist for download, clean, resize, train"):
        step_report.build_report(half)


def test_a_clean_report_without_its_download_output_says_why(outputs, tmp_path):
    copy = tmp_path / "clean-copy"
    shutil.copytree(outputs["clean"].removeprefix("file://"), copy)
    manifest = json.loads((copy / contract.MANIFEST).read_text())
    manifest["upstream"]["source"] = "file://" + str(tmp_path / "gone")
    manifest["extra"].pop("per_split_class")  # as written before the per-split counts existed
    (copy / contract.MANIFEST).write_text(json.dumps(manifest))
    report = step_report.build_report(str(copy))
    rejected = next(s for s in report.sections if isinstance(s, output.Gallery) and s.title == "Rejected images")
    assert not rejected.rows and "no thumbnails" in rejected.note and "not a committed step output" in rejected.note
    chart = next(s for s in report.sections if isinstance(s, output.Chart))
    assert list(chart.series) == ["all splits"] and "predates" in chart.note


# ------------------------------------------------------------------ the pieces


def test_htmlpage_escapes_text_and_attributes():
    assert htmlpage.text("<a href='x'>&\"") == "&lt;a href=&#x27;x&#x27;&gt;&amp;&quot;"
    tag = htmlpage.image("'><script>", b"\x89PNG", title='"x')
    assert "<script>" not in tag and tag.startswith("<img alt='&#x27;&gt;&lt;script&gt;'")
    assert htmlpage.table([{"a": 0.123456, "b": "<b>"}], ["a", "b"]).count("<td>") == 2
    assert "0.1235" in htmlpage.table([{"a": 0.123456}], ["a"])
    svg = htmlpage.bar_chart_svg(["<x>", "y&\x1b"], {"train": [3, 1], "val": [0, 2]})
    assert "&lt;x&gt;" in svg and svg.count("<rect") == 4 and "train (4)" in svg
    labels = [t.text for t in ElementTree.fromstring(svg).iter("{http://www.w3.org/2000/svg}text")]
    assert labels[:2] == ["<x>", "y&\\x1b"], "well-formed SVG whose text is the names, as text"
    with pytest.raises(ValueError, match="2 values for 3 categories"):
        htmlpage.bar_chart_svg(["a", "b", "c"], {"train": [1, 2]})
    assert htmlpage.clip("abcdef", 4) == "abc\u2026"
    assert htmlpage.text("a\x1b[31m\x00b\tc") == "a\\x1b[31m\\x00b\tc"


def test_thumbnail_decodes_small_and_refuses_what_clean_refuses():
    small = thumbnail(f.jpeg(640, 480), 80, 10_000_000)
    assert small.size == (80, 60) and small.mode == "RGB"
    assert thumbnail(f.png16(), 32, 10_000_000).mode == "L"
    with pytest.raises(ImageRejected) as bomb:
        thumbnail(f.png_bomb(12000), 80, 50_000_000)
    assert bomb.value.reason == "too_large"
    with pytest.raises(ImageRejected):
        thumbnail(f.truncated_jpeg(), 80, 10_000_000)
    with pytest.raises(ValueError, match="side and max_pixels"):
        thumbnail(f.jpeg(), 0, 1)


def test_phase_lines_carry_counts_and_time_only(caplog):
    phases = PhaseLog("clean")
    with caplog.at_level(logging.INFO, logger="imgpipe.steps.clean"):
        seconds = phases.done("decode", rows=725, rejected=5, ratio=0.5)
    assert seconds >= 0 and re.fullmatch(r"clean: decode: rows=725 rejected=5 ratio=0\.5 \(\d+\.\d\d s, peak RSS \d+ MB\)", caplog.messages[-1])
    with pytest.raises(TypeError, match="counts only"):
        phases.done("fetch", source="s3://key:secret@bucket/x")


def test_every_data_step_logs_its_phases(outputs, tmp_path, caplog):
    store = "file://" + str(tmp_path / "store")
    with caplog.at_level(logging.INFO, logger="imgpipe"):
        dl = download([str(_tar(tmp_path / "a.tar.gz"))], f"{store}/download", DownloadConfig())
        clean(dl.dest, f"{store}/clean", CleanConfig(workers=1, label_source="folder"))
    lines = [m for m in caplog.messages if re.fullmatch(r"(download|clean): [a-z ]+: .* \(\d+\.\d\d s, peak RSS \d+ MB\)", m)]
    phases = [tuple(m.split(": ")[:2]) for m in lines]
    assert phases == [
        ("download", "fetch"),
        ("download", "dry run"),
        ("download", "extract"),
        ("download", "commit"),
        ("clean", "plan"),
        ("clean", "decode"),
        ("clean", "write"),
        ("clean", "commit"),
    ]
    assert "download: commit: outputs=25 rejected=2 files=1" in " ".join(lines)


# ------------------------------------------------------------------ resize and train (Ray, torch)


@pytest.fixture(scope="module")
def resized(outputs, ray_session) -> str:
    from imgpipe.resize.config import ResizeConfig
    from imgpipe.steps.resize import resize

    cfg = ResizeConfig(size=32, train_mode="whole", ops=("equalize",), concurrency=1)
    return resize(outputs["clean"], outputs["clean"].rsplit("/", 1)[0] + "/resize", cfg).dest


@pytest.mark.ray
def test_resize_report_shows_before_and_after(resized):
    report = step_report.build_report(resized)
    manifest = contract.read_manifest(resized)
    assert report.metrics["outputs"] == manifest["outputs"] and report.metrics["size"] == 32
    assert {"train_rows", "val_rows", "test_rows"} <= set(report.metrics)
    gallery = next(s for s in report.sections if isinstance(s, output.Gallery))
    assert 0 < len(gallery.rows) <= output.ReportLimits().samples
    for label, (before, after) in gallery.rows:
        assert before.picture is not None and after.picture is not None, label
        mode = "whole" if label.endswith("(train)") else "short-side-crop"
        assert after.caption.endswith(f"{mode} +equalize")
    settings = dict(next(s for s in report.sections if isinstance(s, output.Table) and s.title == "Settings").rows)
    assert settings["mode"] == "short-side-crop" and settings["train_mode"] == "whole" and settings["ops"] == "equalize"
    page = report.html()
    _assert_safe_page(page)
    assert "<h2>Before and after</h2>" in page and "<h2>Rejects by reason</h2>" in page


@pytest.mark.ray
def test_resize_report_without_its_clean_output(resized, tmp_path):
    copy = tmp_path / "resize-copy"
    shutil.copytree(resized.removeprefix("file://"), copy)
    manifest = json.loads((copy / contract.MANIFEST).read_text())
    manifest["upstream"]["source"] = "file://" + str(tmp_path / "gone")
    (copy / contract.MANIFEST).write_text(json.dumps(manifest))
    gallery = next(s for s in step_report.build_report(str(copy)).sections if isinstance(s, output.Gallery))
    assert gallery.rows and all(before.picture is None and after.picture is not None for _, (before, after) in gallery.rows)
    assert "no sources" in gallery.note


@pytest.mark.ray
def test_train_report_is_its_own_page_and_metrics(resized, outputs):
    from imgpipe.steps.train import train
    from imgpipe.train.config import TrainConfig

    cfg = TrainConfig(model="tiny_cnn", epochs=1, batch_size=4, num_workers=0, device="cpu", aug_policy="basic", max_steps_per_epoch=2)
    out = train(resized, outputs["clean"].rsplit("/", 1)[0] + "/train", cfg).dest
    report = step_report.build_report(out)
    assert report.html() == storage.read_bytes(f"{out}/report.html").decode()
    assert report.metrics["epochs_run"] == 1 and "val_accuracy" in report.metrics
    assert "val_accuracy" in report.text() and "tiny_cnn" in report.text()
    assert report.grid_png().startswith(b"\x89PNG")
