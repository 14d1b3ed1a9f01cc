from pathlib import Path

from setuptools import find_packages, setup


def _requirements() -> list[str]:
    lines = Path(__file__).with_name("requirements-training.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="fastclip",
    version="1.0.0",
    description="CLIP training with global contrastive losses by compositional optimisation (FastCLIP)",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"fastclip": ["model_configs/*.json"]},
    python_requires=">=3.10",
    install_requires=_requirements(),
    entry_points={
        "console_scripts": [
            "fastclip-train = training.main:cli",
            "fastclip-index = fastclip.data.index:main",
            "fastclip-export = fastclip.tools.export:main",
            "fastclip-plot = fastclip.tools.plot:main",
        ],
    },
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2.1", "scikit-learn", "requests", "fonttools", "tensorboard", "wandb", "accelerate"],
        # scikit-learn: the handwritten digits of bench/convergence.py; fonttools: the fonts of bench/fonts.py
        "bench": ["scikit-learn", "fonttools"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        # examples/accelerate_loop.py: the loss under Hugging Face Accelerate
        "examples": ["accelerate"],
    },
)
