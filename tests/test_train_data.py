"""Training data: both folder formats, every bad-file case, missing captions, image conversions, data order."""

from __future__ import annotations

import io
import json
import random
import warnings

import numpy as np
import pytest
from PIL import Image

from latentdiff.training.data import (
    CaptionedImages,
    DataError,
    Example,
    bad_files_message,
    find_examples,
    parse_background_mix,
    parse_shapes_mix,
    parse_shapes_spec,
)
from latentdiff.training.images import BadImageError, open_rgb, resize_crop, to_rgb, to_tensor
from latentdiff.training.sampler import ResumableBatches


def _png(path, size=(24, 20), color=(200, 30, 30), mode="RGB"):
    Image.new(mode, size, color).save(path)
    return path


def _kohya(folder, n=3, caption=True):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _png(folder / f"img{i}.png", color=(i * 40, 100, 200))
        if caption:
            (folder / f"img{i}.txt").write_text(f"caption {i}\n")
    return folder


# ---- formats ---------------------------------------------------------------------------------------------
def test_kohya_folder_pairs_images_with_same_stem_captions(tmp_path):
    data = _kohya(tmp_path / "d")
    (data / "sub").mkdir()
    _png(data / "sub" / "deep.jpg")
    (data / "sub" / "deep.txt").write_text("a deep one")
    (data / "orphan.txt").write_text("no image for me")
    (data / ".hidden.png").write_bytes(b"junk")
    found = find_examples(data)
    captions = {ex.path.name: ex.caption for ex in found.examples}
    assert captions == {
        "img0.png": "caption 0",
        "img1.png": "caption 1",
        "img2.png": "caption 2",
        "deep.jpg": "a deep one",
    }
    # a caption whose image is gone is named in the warning, not dropped in silence
    assert found.bad_files == [(data / "orphan.txt", "caption without an image of the same name")]


def test_metadata_jsonl_folder(tmp_path):
    data = tmp_path / "d"
    (data / "imgs").mkdir(parents=True)
    rows = []
    for i in range(3):
        _png(data / "imgs" / f"{i}.png")
        rows.append({"file_name": f"imgs/{i}.png", "text": f"shape {i}", "extra": [1, 2]})
    rows.append({"file_name": "imgs/gone.png", "text": "listed but missing"})
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    found = find_examples(data)
    assert [(ex.path.name, ex.caption) for ex in found.examples] == [(f"{i}.png", f"shape {i}") for i in range(3)]
    assert [p.name for p, _ in found.bad_files] == ["gone.png"]


def test_metadata_csv_folder_with_custom_columns(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    for i in range(2):
        _png(data / f"{i}.png")
    (data / "metadata.csv").write_text('image,caption\n0.png,"red, big"\n1.png,small\n')
    found = find_examples(data, image_column="image", caption_column="caption")
    assert [ex.caption for ex in found.examples] == ["red, big", "small"]
    with pytest.raises(DataError, match="no 'file_name'.*--image-column"):
        find_examples(data)


def test_broken_metadata_is_a_clear_error(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    (data / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{oops\n')
    with pytest.raises(DataError, match="metadata.jsonl, line 2: not valid JSON"):
        find_examples(data)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_metadata_and_captions_as_windows_tools_save_them(tmp_path, encoding):
    """Excel's "CSV UTF-8" and Notepad start the file with a byte-order mark; PowerShell 5 writes UTF-16."""
    for name in ("csv", "jsonl", "kohya"):
        data = tmp_path / encoding / name
        data.mkdir(parents=True)
        _png(data / "0.png")
        text = {
            "csv": ("metadata.csv", "file_name,text\r\n0.png,café au lait\r\n"),
            "jsonl": ("metadata.jsonl", '{"file_name": "0.png", "text": "café au lait"}\r\n'),
            "kohya": ("0.txt", "café au lait\r\n"),
        }[name]
        (data / text[0]).write_bytes(text[1].encode(encoding))
        found = find_examples(data)
        assert [(ex.path.name, ex.caption) for ex in found.examples] == [("0.png", "café au lait")], name
        assert found.bad_files == []


def test_text_in_another_encoding_is_named_not_garbled(tmp_path):
    data = _kohya(tmp_path / "kohya")
    (data / "img1.txt").write_bytes("café".encode("latin-1"))
    found = find_examples(data)
    assert [ex.path.name for ex in found.examples] == ["img0.png", "img2.png"]
    assert [(p.name, why) for p, why in found.bad_files] == [
        ("img1.png", f"caption {data / 'img1.txt'}: not UTF-8 (line 1, byte 3); save it as UTF-8")
    ]
    (data / "img0.txt").write_bytes(b"\xe9")
    (data / "img2.txt").write_bytes(b"\xe9")
    with pytest.raises(DataError, match=r"no usable images in .*\n  img0.png: caption .*img0.txt: not UTF-8"):
        find_examples(data)

    meta = tmp_path / "meta"
    meta.mkdir()
    _png(meta / "0.png")
    (meta / "metadata.csv").write_bytes("file_name,text\n0.png,café\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"metadata.csv: not UTF-8 \(line 2, byte 24\); save it as UTF-8"):
        find_examples(meta)


# ---- bad files -------------------------------------------------------------------------------------------
def _truncated(path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _truncated_jpeg(path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _corrupt(path):
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(range(64))  # garbage inside the compressed image data
    path.write_bytes(bytes(data))


BAD_CASES = {
    "truncated.png": (_truncated, "truncated"),
    "truncated.jpg": (_truncated_jpeg, "truncated"),
    "corrupt.png": (_corrupt, "corrupt"),
    "zero.png": (lambda p: p.write_bytes(b""), "0 bytes"),
    "text.jpg": (lambda p: p.write_text("this is not an image"), "not an image"),
    "notes.pdf": (lambda p: p.write_bytes(b"%PDF-1.4 not really"), "not an image"),
    "bomb.png": (lambda p: _png(p, size=(100, 100)), "decompression bomb"),  # > 2x the limit: Pillow's error
    "bomb_warn.png": (lambda p: _png(p, size=(40, 40)), "decompression bomb"),  # 1x..2x: Pillow's warning
}


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_each_bad_file_is_skipped_with_its_reason(tmp_path, name):
    data = _kohya(tmp_path / "d", n=2)
    make, reason = BAD_CASES[name]
    make(data / name)
    (data / name).with_suffix(".txt").write_text("caption of a bad file")
    found = find_examples(data, max_pixels=1000)
    assert sorted(ex.path.name for ex in found.examples) == ["img0.png", "img1.png"]
    assert [(p.name, reason in why) for p, why in found.bad_files] == [(name, True)]


def test_all_bad_files_named_in_one_message(tmp_path):
    data = _kohya(tmp_path / "d", n=1)
    for name, (make, _) in BAD_CASES.items():
        make(data / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scanning itself must not warn (no stray DecompressionBombWarning)
        found = find_examples(data, max_pixels=1000)
    assert len(found.examples) == 1
    message = bad_files_message(found.bad_files, data)
    assert message.startswith(f"skipped {len(BAD_CASES)} unusable file(s)")
    for name in BAD_CASES:
        assert name in message


def test_open_rgb_raises_bad_image_error(tmp_path):
    (tmp_path / "z.png").write_bytes(b"")
    with pytest.raises(BadImageError, match="0 bytes"):
        open_rgb(tmp_path / "z.png")
    _png(tmp_path / "big.png", size=(50, 50))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BadImageError, match="decompression bomb: 50x50"):
            open_rgb(tmp_path / "big.png", max_pixels=2000)


def test_empty_and_missing_folders_are_errors(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        find_examples(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        find_examples(tmp_path / "empty")
    (tmp_path / "allbad").mkdir()
    (tmp_path / "allbad" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"no usable images in .*allbad:\n  x.png: empty file \(0 bytes\)$"):
        find_examples(tmp_path / "allbad")


# ---- missing captions ------------------------------------------------------------------------------------
def test_missing_captions_error_names_the_files(tmp_path):
    data = _kohya(tmp_path / "d", n=2)
    _png(data / "lonely.png")
    with pytest.raises(DataError, match=r"1 image\(s\).*no caption: lonely.png.*--missing-captions skip"):
        find_examples(data)


def test_missing_captions_skip_and_empty(tmp_path):
    data = _kohya(tmp_path / "d", n=2)
    _png(data / "lonely.png")
    skipped = find_examples(data, missing_captions="skip")
    assert sorted(ex.path.name for ex in skipped.examples) == ["img0.png", "img1.png"]
    assert [p.name for p in skipped.uncaptioned] == ["lonely.png"]
    empty = find_examples(data, missing_captions="empty")
    assert {ex.path.name: ex.caption for ex in empty.examples}["lonely.png"] == ""


def test_missing_caption_in_metadata(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    _png(data / "a.png")
    _png(data / "b.png")
    (data / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{"file_name": "b.png"}\n')
    with pytest.raises(DataError, match="no caption: b.png"):
        find_examples(data)


# ---- image conversions -----------------------------------------------------------------------------------
def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 5, 10))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = open_rgb(tmp_path / "r.jpg")
    assert out.size == (10, 30)
    assert out.getpixel((5, 2))[2] > 200  # the blue strip is now at the top


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "PA"])
def test_transparency_composited_on_white(mode):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    if mode == "P":
        img = rgba.convert("RGB").convert("P")
        img.info["transparency"] = img.getpixel((1, 1))
    elif mode == "PA":
        img = rgba.convert("PA")
    else:
        img = rgba.convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB"
    assert out.getpixel((2, 2)) == (255, 255, 255)
    assert out.getpixel((0, 0)) != (255, 255, 255)


def test_cmyk_and_16_bit_convert_to_rgb(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = open_rgb(tmp_path / "c.jpg").getpixel((1, 1))
    assert r > 200 and g < 60 and b < 60
    wide = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(wide).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_resize_and_crops():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # left quarter white
    centre = resize_crop(img, 16)
    assert centre.size == (16, 16)
    assert centre.getpixel((0, 8))[0] < 30  # the white quarter was cropped away
    crops = {resize_crop(img, 16, random_crop=True, rng=random.Random(s)).tobytes() for s in range(8)}
    assert len(crops) > 1
    flipped = resize_crop(img, 20, flip=True)
    assert flipped.getpixel((19, 5))[0] < 30 and resize_crop(img, 20).getpixel((19, 5))[0] < 30
    t = to_tensor(centre)
    assert t.shape == (3, 16, 16) and t.min() >= -1 and t.max() <= 1


def test_dataset_items_are_deterministic_and_unflipped_by_default(tmp_path):
    img = Image.new("RGB", (32, 32), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 8, 32))
    img.save(tmp_path / "a.png")
    ds = CaptionedImages([Example(tmp_path / "a.png", "left white")], 16, caption_dropout=0.5, seed=3)
    items = [ds[(epoch, 0)] for epoch in range(20)]
    assert all((it["pixels"][:, :, 0] > 0.9).all() for it in items)  # left column always white: no flips
    assert {it["caption"] for it in items} == {"", "left white"}  # caption dropout happens, per epoch
    again = ds[(5, 0)]
    assert again["caption"] == items[5]["caption"]


def test_shapes_spec():
    assert parse_shapes_spec("shapes") == 0
    assert parse_shapes_spec("shapes:7") == 7
    assert parse_shapes_spec("/data/shapes") is None
    with pytest.raises(DataError, match="integer"):
        parse_shapes_spec("shapes:x")


def test_shapes_scenes_dataset():
    from latentdiff.training.data import ShapesScenes

    ds = ShapesScenes(10, 32, scene_seed=1, caption_dropout=0.0)
    a, b = ds[(0, 3)], ds[(4, 3)]
    assert a["pixels"].shape == (3, 32, 32)
    assert a["caption"] == b["caption"] and (a["pixels"] == b["pixels"]).all()


# ---- data order ------------------------------------------------------------------------------------------
def test_batches_cover_epochs_and_split_across_ranks():
    one = ResumableBatches(10, 2, seed=0)
    stream = iter(one)
    first_epoch = [k for _ in range(5) for k in next(stream)]
    assert sorted(i for _, i in first_epoch) == list(range(10)) and {e for e, _ in first_epoch} == {0}
    r0, r1 = ResumableBatches(10, 2, 0, rank=0, world_size=2), ResumableBatches(10, 2, 0, rank=1, world_size=2)
    assert r0.batch(0) + r1.batch(0) == one.batch(0) + one.batch(1)
    resumed = iter(ResumableBatches(10, 2, seed=0, start=7))
    assert next(resumed) == one.batch(7)
    assert ResumableBatches(3, 4, 0).batch(0)[3][0] == 1  # datasets smaller than a batch wrap into epoch 1


def test_shapes_mix_parses_and_names_its_mistakes():
    mix = parse_shapes_mix("position=3, two_objects=0.5")
    assert mix == {"single": 1.0, "counting": 1.0, "two_objects": 0.5, "position": 3.0}
    assert parse_shapes_mix(None) is None and parse_shapes_mix("") is None
    for spec, words in [
        ("left=2", "not CATEGORY=WEIGHT"),
        ("position", "not CATEGORY=WEIGHT"),
        ("position=many", "must be a number"),
        ("position=-1", ">= 0"),
        ("single=0,counting=0,two_objects=0,position=0", "above 0"),
    ]:
        with pytest.raises(DataError, match=words):
            parse_shapes_mix(spec)


def test_background_mix_parses_and_names_its_mistakes():
    assert parse_background_mix("gray=2") == {"white": 1.0, "black": 1.0, "gray": 2.0}
    assert parse_background_mix(None) is None
    for spec, words in [("grey=2", "not BACKGROUND=WEIGHT.*white, black, gray"), ("gray=x", "must be a number")]:
        with pytest.raises(DataError, match=f"--background-mix '{spec}'.*{words}"):
            parse_background_mix(spec)


def test_float_images_in_0_to_1_become_full_range(tmp_path):
    a = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4)
    Image.fromarray(a).save(tmp_path / "f.tif")
    out = np.asarray(open_rgb(tmp_path / "f.tif"))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert to_rgb(Image.fromarray(np.full((2, 2), 200.0, dtype=np.float32))).getpixel((0, 0)) == (200, 200, 200)


# ---- what a scan must not drop in silence ----------------------------------------------------------------
def test_metadata_captions_that_are_not_text_are_skipped_with_the_row(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    rows = [("a", ["a cat", "a dog"]), ("b", {"en": "a cat"}), ("c", 123), ("d", True), ("e", "fine")]
    for name, _ in rows:
        _png(data / f"{name}.png")
    (data / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{n}.png", "text": t}) + "\n" for n, t in rows)
    )
    found = find_examples(data)
    assert [(ex.path.name, ex.caption) for ex in found.examples] == [("e.png", "fine")]
    assert [(p.name, why) for p, why in found.bad_files] == [
        ("a.png", "metadata.jsonl row 1: the 'text' is a list, not a string"),
        ("b.png", "metadata.jsonl row 2: the 'text' is a dict, not a string"),
        ("c.png", "metadata.jsonl row 3: the 'text' is a int, not a string"),
        ("d.png", "metadata.jsonl row 4: the 'text' is a bool, not a string"),
    ]


def test_a_caption_column_in_no_row_is_named(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    _png(data / "a.png")
    (data / "metadata.jsonl").write_text('{"file_name": "a.png", "caption": "x"}\n')
    with pytest.raises(DataError, match=r"no row of .*metadata.jsonl has a 'text' column \(columns: \['caption', "):
        find_examples(data)
    with pytest.warns(UserWarning, match="set --caption-column"):  # allowed, but most likely a typo
        assert [ex.caption for ex in find_examples(data, "empty").examples] == [""]
    assert [ex.caption for ex in find_examples(data, caption_column="caption").examples] == ["x"]


@pytest.mark.parametrize("extension", ["caption", ".caption", ".CAPTION", " caption "])
def test_caption_extension_with_or_without_dot_or_capitals(tmp_path, extension):
    data = tmp_path / "d"
    data.mkdir()
    _png(data / "a.png")
    (data / "a.caption").write_text("x")
    assert [ex.caption for ex in find_examples(data, caption_extension=extension).examples] == ["x"]
    with pytest.raises(DataError, match="--caption-extension '.' is empty"):
        find_examples(data, caption_extension=".")


def test_the_runs_own_output_folder_inside_the_data_is_not_read(tmp_path):
    data = _kohya(tmp_path / "d", n=2)
    (data / "run").mkdir()
    _png(data / "run" / "loss_curve.png")
    assert len(find_examples(data, "empty").examples) == 3
    assert [ex.path.name for ex in find_examples(data, skip=data / "run").examples] == ["img0.png", "img1.png"]


def test_symlinked_folders_are_read_and_broken_links_named(tmp_path):
    data = _kohya(tmp_path / "d", n=1)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    _png(outside / "y.png")
    (outside / "y.txt").write_text("linked")
    (data / "linked").symlink_to(outside)
    (data / "loop").symlink_to(data)  # followed once, not forever
    (data / "broken.png").symlink_to(tmp_path / "gone.png")
    (data / "broken.txt").write_text("its image is a dangling link")
    found = find_examples(data)
    assert sorted((ex.path.name, ex.caption) for ex in found.examples) == [
        ("img0.png", "caption 0"),
        ("y.png", "linked"),
    ]
    assert [(p.name, why) for p, why in found.bad_files] == [
        ("broken.png", f"broken symbolic link (to {tmp_path / 'gone.png'})")
    ]
