"""Image input: every problem names the file and says what is wrong."""

import io

import pytest
from PIL import Image

from raybooth.platform.errors import ImageError
from raybooth.platform.images import check_same_size, list_images, open_image, open_mask


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    assert open_image(path).size == (20, 40)


def test_modes_are_normalised(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert open_image(png(rgba)).mode == "RGB"
    assert open_image(png(rgba)).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert open_mask(png(Image.new("RGB", (8, 8), (255, 255, 255)))).mode == "L"
    painted = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    painted.putpixel((1, 1), (0, 0, 0, 255))
    # A mask with transparency follows the OpenAI Images API: transparent = repaint, opaque = keep.
    assert open_mask(png(painted)).getpixel((1, 1)) == 0
    assert open_mask(png(painted)).getpixel((0, 0)) == 255


def test_corrupt_truncated_and_unsupported_files_are_named(tmp_path):
    data = png(Image.new("RGB", (64, 64), (1, 2, 3)))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.png.*corrupt or truncated"):
        open_image(tmp_path / "cut.png", name=str(tmp_path / "cut.png"))
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageError, match=r"notes\.png: plain text, not an image"):
        open_image(tmp_path / "notes.png", name=str(tmp_path / "notes.png"))
    with pytest.raises(ImageError, match="file not found"):
        open_image(tmp_path / "absent.png", name="absent.png")
    with pytest.raises(ImageError, match="empty"):
        open_image(b"", name="upload")


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    big = png(Image.new("L", (300, 300)))
    with pytest.raises(ImageError, match=r"photo: 300x300 is 90000 pixels, over the limit of 10000"):
        open_image(big, name="photo", limit=10_000)


def test_size_mismatch_names_both(tmp_path):
    with pytest.raises(ImageError, match="mask.png is 4x4 but photo.png is 8x8") as err:
        check_same_size(Image.new("RGB", (8, 8)), Image.new("L", (4, 4)), "photo.png", "mask.png")
    assert err.value.field == "mask.png"


def test_list_images(tmp_path):
    with pytest.raises(ImageError, match="no images"):
        list_images(tmp_path, "subject.instance_data_dir")
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.jpg")
    (tmp_path / "readme.txt").write_text("x")
    assert [p.name for p in list_images(tmp_path, "x")] == ["a.jpg", "b.png"]
