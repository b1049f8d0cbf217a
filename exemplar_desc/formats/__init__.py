"""The files the package writes for other programs: hloc's HDF5 layout and COLMAP's import format."""
