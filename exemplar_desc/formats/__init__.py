"""The files the package writes for other programs, shared by ``extract`` and ``sfm``.

:mod:`.hloc`: hloc's ``features.h5`` and ``matches.h5`` (layout, writing, reading, merging
the part files of several processes). :mod:`.colmap`: COLMAP's uint8 descriptors, keypoint
convention and feature-import text files.
"""
