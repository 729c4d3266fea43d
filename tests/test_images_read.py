import numpy as np
import pytest
import tifffile
from PIL import Image

from morphoprof.errors import ImageReadError, InputError
from morphoprof.images.read import image_shape, read_plane, read_planes, read_stack


def test_tiff_uint16_read_as_float32_in_file_units(tmp_path):
    arr = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 97) % 65535
    tifffile.imwrite(tmp_path / "a.tif", arr)
    out = read_plane(tmp_path / "a.tif")
    assert out.dtype == np.float32 and out.shape == (20, 30)
    np.testing.assert_array_equal(out, arr.astype(np.float32))
    assert image_shape(tmp_path / "a.tif") == (20, 30)


def test_rgb_png_frames_select_channels(tmp_path):
    rgb = np.zeros((8, 9, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 30
    Image.fromarray(rgb).save(tmp_path / "x.png")
    assert image_shape(tmp_path / "x.png", 2) == (8, 9)
    stack = read_stack([tmp_path / "x.png"] * 3, [2, 1, 0])
    assert stack.shape == (3, 8, 9)
    assert stack[:, 0, 0].tolist() == [30.0, 20.0, 10.0]
    with pytest.raises(ImageReadError, match="frame"):
        read_plane(tmp_path / "x.png")  # a 3-channel file needs a frame
    with pytest.raises(ImageReadError, match="out of range"):
        read_plane(tmp_path / "x.png", 5)


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00garbage")
    with pytest.raises(ImageReadError, match="broken.tif"):
        read_plane(bad)
    arr = np.ones((64, 64), np.uint16)
    tifffile.imwrite(tmp_path / "full.tif", arr)
    data = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "trunc.tif").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError, match="trunc.tif"):
        read_plane(tmp_path / "trunc.tif")
    (tmp_path / "t.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    with pytest.raises(ImageReadError, match="t.png"):
        read_plane(tmp_path / "t.png")


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(ImageReadError, match="file not found"):
        read_plane(tmp_path / "nope.tif")
    (tmp_path / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(ImageReadError, match="unsupported file type"):
        read_plane(tmp_path / "a.gif")


def test_stack_with_mismatched_shapes_names_files(tmp_path):
    tifffile.imwrite(tmp_path / "dna.tif", np.zeros((10, 10), np.uint16))
    tifffile.imwrite(tmp_path / "actin.tif", np.zeros((10, 12), np.uint16))
    with pytest.raises(InputError, match="actin.tif"):
        read_stack([tmp_path / "dna.tif", tmp_path / "actin.tif"], channel_names=["DNA", "Actin"])


def test_read_planes_keeps_the_files_pixel_types_and_refuses_nan_in_float_files(tmp_path):
    dna = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 431) % 65535
    actin = np.linspace(0, 1, 120, dtype=np.float32).reshape(12, 10)
    tifffile.imwrite(tmp_path / "dna.tif", dna)
    tifffile.imwrite(tmp_path / "actin.tif", actin)
    paths = [tmp_path / "dna.tif", tmp_path / "actin.tif"]
    planes = read_planes(paths, channel_names=["DNA", "Actin"])
    assert [p.dtype for p in planes] == [np.uint16, np.float32]
    np.testing.assert_array_equal(planes[0], dna)
    stack = read_stack(paths, channel_names=["DNA", "Actin"])  # the same pixels, as float32
    assert stack.dtype == np.float32
    np.testing.assert_array_equal(stack, np.stack([dna.astype(np.float32), actin]))
    actin[3, 4] = np.inf
    tifffile.imwrite(tmp_path / "actin.tif", actin)
    for read in (read_planes, read_stack):
        with pytest.raises(InputError, match=r"NaN or infinite pixels in channel\(s\) \['Actin'\] "
                                             f"\\({tmp_path / 'actin.tif'}\\)"):
            read(paths, channel_names=["DNA", "Actin"])
