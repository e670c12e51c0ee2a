"""fastibot: fast iBOT pretraining for Vision Transformers."""
from setuptools import setup

setup(
    name="fastibot",
    version="0.1.0",
    description="Fast iBOT self-supervised pretraining for Vision Transformers "
    "(fused Triton loss and EMA kernels, packed multi-crop attention, GPU data pipeline).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ and configs/ live at the top of the repository and install as
    # fastibot.kernels and fastibot.configs.
    packages=[
        "fastibot",
        "fastibot.models",
        "fastibot.data",
        "fastibot.eval",
        "fastibot.kernels",
        "fastibot.configs",
    ],
    package_dir={
        "fastibot": "fastibot",
        "fastibot.kernels": "kernels",
        "fastibot.configs": "configs",
    },
    package_data={"fastibot.configs": ["*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        # 0.9.0: the first release with timm.layers (the ViT's parts) and .safetensors in
        # create_model(checkpoint_path=...), which the export snippet uses (tested 0.9.0 to 1.0.31)
        "timm>=0.9.0",
        "pyyaml>=6",
        "numpy",
        "pillow",
        "tqdm",
        "safetensors",
        "tensorboard",
    ],
    extras_require={
        # the DALI tests run DALI's CPU operators; its wheels exist for x86-64 Linux
        "dev": ["pytest>=8", "pytest-timeout>=2.1", "scipy", "hypothesis>=6",
                "nvidia-dali-cuda130; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "dali": ["nvidia-dali-cuda130"],
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["fastibot=fastibot.cli:main"]},
)
