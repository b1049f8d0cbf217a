from setuptools import find_packages, setup

setup(
    name="exemplar_desc",
    version="0.1.0",
    description="Exemplar-CNN local feature descriptor with an OpenCV-style API",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["exemplar_desc", "exemplar_desc.*", "benchmarks"]) + ["exemplar_desc.weights"],
    # weights/ lives at the top level of the repository but installs inside the package,
    # so ExemplarDescriptor() finds it from any working directory.
    package_dir={"exemplar_desc.weights": "weights"},
    package_data={"exemplar_desc.weights": ["*.pt", "*.json", "*.md"]},
    install_requires=[
        "torch>=2.1",
        "kornia>=0.7",
        "opencv-python-headless>=4.8",
        "numpy>=1.24",
        "scipy>=1.10",
        "h5py>=3.8",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "scikit-image>=0.21",
        "pycolmap>=4.2",  # the Rig/Frame database API; 4.2.1 is the tested version
    ],
    entry_points={
        "console_scripts": [
            "exemplar-train = exemplar_desc.train:main",
            "exemplar-adapt = exemplar_desc.adapt:main",
            "exemplar-sfm = exemplar_desc.sfm.__main__:main",
            "exemplar-match = exemplar_desc.viewer:main",
            "exemplar-extract = exemplar_desc.extract:main",
            "exemplar-export = exemplar_desc.export:main",
        ]
    },
    extras_require={
        "onnx": ["onnx>=1.14"],  # python -m exemplar_desc.export (torch's TorchScript exporter needs nothing else)
        "test": ["pytest>=7", "onnx>=1.14"],
    },
)
