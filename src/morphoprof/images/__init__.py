"""Image reading: TIFF and PNG files into (C, H, W) float32 stacks with named channels."""

from morphoprof.images.read import image_shape, read_plane, read_planes, read_stack

__all__ = ["image_shape", "read_plane", "read_planes", "read_stack"]
