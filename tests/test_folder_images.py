"""Folder images are never converted silently: data.fit never enlarges unless it says so ("resize-up"),
every PIL mode is converted by a stated rule (checked analytically on tiny images), the folder's layout
is never ignored silently, and each bad folder ends in one line (table at the end)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cdm.data import DataConfig, DataError, fit_to, load_dataset
from cdm.folder import decode_image, list_folder, pixels
from cdm.prepare import PrepareConfig, prepare

from conftest import write_idx
from test_cli import write_tiny
from test_faults import cli_error


def folder(root, sizes=None, mode="RGB", value=(90, 90, 90)):
    """``root/a`` and ``root/b``, each with one image per size in ``sizes`` (default: one 16 px image)."""
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(sizes or [16]):
            Image.new(mode, (s, s), value).save(root / cls / f"{i}.png")
    return root


def load(root, **kw):
    return load_dataset(DataConfig(source="folder", path=str(root), split="all", **kw))


def no_warnings(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


# ----------------------------------------------------------------------------- data.fit
def test_resize_refuses_enlarging_from_the_header_and_resize_up_enlarges_on_purpose(tmp_path, monkeypatch):
    root = folder(tmp_path / "photos", sizes=[32, 40])
    import cdm.folder

    read = []
    monkeypatch.setattr(cdm.folder, "pixels", lambda im: read.append(im) or pixels(im))
    with pytest.raises(DataError, match=r'image .*a/0\.png is 32x32 px, smaller than data.resolution = 64 px, and '
                                        r'data.fit = "resize" never enlarges: use a data.resolution at or below the '
                                        r'images\' size \(a preset for 32 px sources: see `cdm presets`\), or '
                                        r'data.fit = "resize-up" to enlarge them on purpose'):
        load(root, resolution=64, fit="resize")  # on_bad = skip: a setting is not a damaged file
    assert read == []  # refused at the first image, from its header: no pixels were read
    with pytest.warns(UserWarning, match=r"4 of 4 images in .* smaller than data.resolution = 64px .*resize-up"):
        assert load(root, resolution=64, fit="resize-up").images.shape == (4, 3, 64, 64)
    big = no_warnings(lambda: load(root, resolution=16, fit="resize"))  # downscaling: nothing to say
    assert big.images.shape == (4, 3, 16, 16) and (big.images == 90).all()
    with pytest.raises(DataError, match="data.fit must be 'pad', 'resize' \\(downscale only\\) or 'resize-up'"):
        DataConfig(fit="upsample")


def test_pad_pads_smaller_images_and_downscales_larger_ones_as_resize_does():
    x = torch.full((1, 1, 40, 48), 200, dtype=torch.uint8)
    assert torch.equal(fit_to(x, 32, "pad"), fit_to(x, 32, "resize"))  # never enlarged, never refused
    small = fit_to(torch.full((1, 1, 20, 30), 200, dtype=torch.uint8), 24, "pad")[0, 0]
    assert (small[2:22, 2:22] == 200).all() and small.sum() == 200 * 20 * 20  # centred on black
    with pytest.raises(DataError, match=r"the images is 30x20 px"):
        fit_to(torch.zeros(1, 1, 20, 30, dtype=torch.uint8), 24, "resize")


def test_array_sources_are_refused_whole(tmp_path, toy_npz):
    with pytest.raises(DataError, match=r"the images in .*toy.npz are 16x16 px, smaller|is 16x16 px, smaller"):
        load_dataset(DataConfig(source="npz", path=str(toy_npz), resolution=32, fit="resize"))
    for prefix, n in (("train", 3), ("t10k", 2)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", np.zeros((n, 28, 28)), gz=False)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n), gz=False)
    with pytest.raises(DataError, match=r"Fashion-MNIST's images .* 28x28 px, smaller than data.resolution = 32"):
        load_dataset(DataConfig(source="fashion-mnist", path=str(tmp_path), resolution=32, fit="resize"))
    with pytest.raises(DataError, match=r"smaller than --resolution = 32 px, and --fit resize never enlarges.*"
                                        r"--fit resize-up to enlarge them on purpose"):
        prepare(PrepareConfig(str(toy_npz), str(tmp_path / "p"), 32, fit="resize", progress=False))
    assert not (tmp_path / "p" / "manifest.json").exists()


@pytest.mark.parametrize("channels", [0, 3])
def test_prepare_refuses_before_writing_whatever_on_bad_says(tmp_path, channels, capsys):
    from cdm.cli import main

    root = folder(tmp_path / "photos", sizes=[40, 20])
    err = cli_error(capsys, ["prepare", str(root), "--out", str(tmp_path / "p"), "--resolution", "32", "--fit",
                             "resize", "--channels", str(channels), "--on-bad", "skip", "--workers", "1",
                             "--no-progress"])
    assert "1.png is 20x20 px, smaller than --resolution = 32 px" in err and "--fit resize-up" in err
    assert not (tmp_path / "p" / "manifest.json").exists()  # the headers were read first: nothing written
    with pytest.warns(UserWarning, match="2 of 4 images in .* were enlarged"):
        assert main(["prepare", str(root), "--out", str(tmp_path / "q"), "--resolution", "32", "--fit", "resize-up",
                     "--workers", "1", "--no-progress"]) == 0
    assert '"fit": "resize-up"' in (tmp_path / "q" / "manifest.json").read_text()


# ----------------------------------------------------------------------------- image modes
def decoded(tmp_path, im, channels=0, name="x.png", **save):
    path = tmp_path / name
    im.save(path, **save)
    out, _ = decode_image(path, min(im.size), "pad", channels)
    return out


def test_16_bit_32_bit_and_1_bit_images_are_scaled_never_clipped(tmp_path):
    a16 = np.array([[65535, 32768], [0, 257]], dtype=np.uint16)
    assert decoded(tmp_path, Image.fromarray(a16)).tolist() == [[[255, 128], [0, 1]]]  # a 16-bit PNG
    big_endian = Image.frombytes("I;16B", (2, 2), a16.astype(">u2").tobytes())
    assert pixels(big_endian).tolist() == [[255, 128], [0, 1]]
    assert pixels(Image.fromarray(a16.astype(np.int32))).tolist() == [[255, 128], [0, 1]]  # mode I
    assert pixels(Image.fromarray(np.array([[0, 0.5], [1, 0.2]], np.float32))).tolist() == [[0, 128], [255, 51]]
    with pytest.raises(ValueError, match=r"32-bit float pixels in \[0, 2\], outside \[0, 1\]"):
        pixels(Image.fromarray(np.array([[0, 2]], np.float32)))
    with pytest.raises(ValueError, match=r"32-bit integer pixels in \[0, 70000\], outside \[0, 65535\]"):
        pixels(Image.fromarray(np.array([[0, 70000]], np.int32)))
    one = Image.new("1", (2, 2), 0)
    one.putpixel((1, 0), 1)
    assert decoded(tmp_path, one).tolist() == [[[0, 255], [0, 0]]]


def test_transparency_is_composited_onto_black_in_every_mode(tmp_path):
    def image(mode, *row):  # two equal rows of two pixels
        im = Image.new(mode, (2, 2))
        im.putdata([*row, *row])
        return im

    rgba = image("RGBA", (200, 100, 50, 0), (200, 100, 50, 128))
    half = [[[0, 100]] * 2, [[0, 50]] * 2, [[0, 25]] * 2]  # 200 * 128 / 255 = 100.4, 100 -> 50.2, 50 -> 25.1
    assert decoded(tmp_path, rgba).tolist() == half
    assert decoded(tmp_path, image("LA", (200, 0), (200, 255))).tolist() == [[[0, 200]] * 2]  # stays greyscale
    p = image("P", 0, 1)
    p.putpalette([10, 20, 30, 40, 50, 60])
    assert decoded(tmp_path, p, transparency=0).tolist() == [[[0, 40]] * 2, [[0, 50]] * 2, [[0, 60]] * 2]
    assert decoded(tmp_path, p, name="x.gif").tolist() == [[[10, 40]] * 2, [[20, 50]] * 2, [[30, 60]] * 2]
    assert decoded(tmp_path, rgba, name="x.webp", lossless=True, exact=True).tolist() == half


def test_other_colour_spaces_and_channel_conversions(tmp_path):
    assert pixels(Image.new("CMYK", (1, 1), (0, 0, 0, 0))).tolist() == [[[255, 255, 255]]]
    assert pixels(Image.new("YCbCr", (1, 1), (255, 128, 128))).tolist() == [[[255, 255, 255]]]
    red = Image.new("RGB", (1, 1), (255, 0, 0))
    assert decoded(tmp_path, red, channels=1).tolist() == [[[76]]]  # PIL's luma: 0.299 * 255
    assert decoded(tmp_path, Image.new("L", (1, 1), 7), channels=3).tolist() == [[[7]], [[7]], [[7]]]
    assert decoded(tmp_path, Image.new("I;16", (1, 1), 514), channels=3).tolist() == [[[2]], [[2]], [[2]]]


def test_the_exif_orientation_is_applied_before_the_crop(tmp_path):
    a = (np.arange(8).reshape(2, 4) * 30).astype(np.uint8)  # 4 wide, 2 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: 2 wide, 4 high
    out = decoded(tmp_path, Image.fromarray(a), exif=exif.tobytes())
    assert out[0].tolist() == np.rot90(a, -1)[1:3].tolist()  # the centre 2x2 of the 2x4 upright image


# ----------------------------------------------------------------------------- the folder's layout
def test_nested_hidden_loose_and_looping_files(tmp_path):
    root = folder(tmp_path / "photos")
    for hidden in (root / ".ipynb_checkpoints", root / "a" / ".cache"):
        hidden.mkdir()
        Image.new("RGB", (16, 16)).save(hidden / "x.png")
    (root / ".DS_Store").write_bytes(b"\0")
    (root / "a" / "._0.png").write_bytes(b"resource fork")  # macOS metadata: not an image
    (root / "b" / "notes.txt").write_text("not an image")
    data = no_warnings(lambda: load(root, resolution=16))  # hidden and non-image files: quietly ignored
    assert data.class_names == ["a", "b"] and data.labels.tolist() == [0, 1]

    (root / "a" / "2019" / "june").mkdir(parents=True)
    Image.new("RGB", (16, 16), 7).save(root / "a" / "2019" / "june" / "1.png")
    Image.new("RGB", (16, 16)).save(root / "stray.png")
    os.symlink(root / "a", root / "a" / "loop")
    with pytest.warns(UserWarning) as seen:
        data = load(root, resolution=16)
    lines = sorted(str(w.message) for w in seen)
    assert any("1 image file(s) directly in" in m and "ignored: stray.png" in m for m in lines), lines
    assert any("images in 1 nested folder(s) are read as their top-level folder's class: a/2019/june" in m
               for m in lines), lines
    assert any("not following 1 symbolic link(s)" in m and "a/loop" in m for m in lines), lines
    assert data.labels.tolist() == [0, 0, 1] and data.images[1, 0, 0, 0] == 7  # a/0.png, a/2019/june/1.png, b/0.png


def test_flat_folders_keep_their_order_keys_and_fingerprints(tmp_path):
    root = tmp_path / "flat"
    for c, cls in enumerate(("b", "a")):
        (root / cls).mkdir(parents=True)
        for i in (2, 10, 1):
            Image.new("RGB", (16, 16), (40 * c, 20 * i, 5)).save(root / cls / f"{i}.png")
    names, files = list_folder(root)
    assert names == ["a", "b"] and [f.relative_to(root).as_posix() for f in files[0]] == ["a/1.png", "a/10.png",
                                                                                          "a/2.png"]
    ps = prepare(PrepareConfig(str(root), str(tmp_path / "p"), 16, workers=1, progress=False))
    assert ps.fingerprint == "baf7ff29fbed9870"  # as before the layout rules: a flat folder's set is unchanged


# ----------------------------------------------------------------------------- one line each
def _zero_byte(root):
    (root / "a" / "empty.png").write_bytes(b"")


def _float_image(root):
    Image.fromarray(np.full((16, 16), 3.0, np.float32)).save(root / "a" / "f.tif")


BAD_FOLDERS = [  # (case, how to spoil a good folder, extra settings, the line's key words)
    ("missing path", lambda r: None, ["data.path={root}/nowhere"], "does not exist; set data.path to a folder"),
    ("path is a file", lambda r: None, ["data.path={root}/a/0.png"], "is a file, not a folder; set data.path"),
    ("empty class folder", lambda r: (r / "cats").mkdir(), [],
     "class folder 'cats' in {root} has no images: add images or remove it"),
    ("class of other files", lambda r: ((r / "cats").mkdir(), (r / "cats" / "x.heic").write_bytes(b"1")), [],
     "class folder 'cats' in {root} has no images (1 other file(s), e.g. x.heic, are not"),
    ("class of unreadable files", lambda r: ((r / "cats").mkdir(), (r / "cats" / "x.png").write_bytes(b"1")), [],
     "class folder(s) 'cats' in {root} have no readable images (all unreadable)"),
    ("too small for resize", lambda r: None, ["data.fit=resize", "data.resolution=32"],
     'or data.fit = "resize-up" to enlarge them on purpose'),
    ("unknown fit", lambda r: None, ["data.fit=upscale"], "data.fit must be 'pad', 'resize'"),
    ("zero-byte file", _zero_byte, ["data.on_bad=fail"], "cannot read image {root}/a/empty.png"),
    ("float image out of [0, 1]", _float_image, ["data.on_bad=fail"], "outside [0, 1]: save it with 8 or 16 bits"),
]


@pytest.mark.parametrize("case,spoil,sets,message", BAD_FOLDERS, ids=[c[0] for c in BAD_FOLDERS])
def test_bad_folders_end_in_one_line(case, spoil, sets, message, tmp_path, toy_npz, capsys):
    root = folder(tmp_path / "photos")
    spoil(root)
    cfg = write_tiny(tmp_path, toy_npz, "base", 8, 0, "none")
    sets = ["data.source=folder", f"data.path={root}", *[s.format(root=root) for s in sets]]
    err = cli_error(capsys, ["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress",
                             *[a for kv in sets for a in ("--set", kv)]])
    assert message.format(root=root) in err, err


def test_a_decompression_bomb_is_an_unreadable_file(tmp_path, monkeypatch):
    root = folder(tmp_path / "photos")
    Image.new("L", (64, 64)).save(root / "a" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 is over twice this: refused by PIL
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) in .*huge.png"):
        assert len(load(root, resolution=16)) == 2
    with pytest.raises(DataError, match=r"cannot read image .*huge.png \(.*decompression bomb"):
        load(root, resolution=16, on_bad="fail")


def test_an_icc_profile_other_than_srgb_is_applied_and_a_broken_one_is_unreadable(tmp_path):
    from PIL import ImageCms

    im = Image.new("RGB", (2, 2), (200, 100, 50))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert decoded(tmp_path, im, icc_profile=srgb)[:, 0, 0].tolist() == [200, 100, 50]  # sRGB: as stored
    with pytest.raises(ValueError, match="ICC colour profile cannot be applied"):
        decoded(tmp_path, im, icc_profile=b"not a profile")
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()  # not an RGB profile: cannot apply
    with pytest.raises(ValueError, match="ICC colour profile cannot be applied"):
        decoded(tmp_path, im, icc_profile=lab)
