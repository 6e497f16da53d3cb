"""t5lite: train T5 and decoder-only language models end to end in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="t5lite",
    version="0.1.0",
    description="JAX/Flax training of T5 and decoder-only LMs: data, pretraining, finetuning, "
                "decoding, Hugging Face interop.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["t5lite", "t5lite.*"]),
    # Compiled on first use (t5lite/kernels/cpu_attention.py).
    package_data={"t5lite": ["*.c"], "t5lite.kernels": ["*.cc", "*.h"]},
    python_requires=">=3.10",
    install_requires=[
        # jax 0.10.x is the newest that installs on CPU/Python 3.11; the GPU machines run 0.11.
        "jax>=0.10.0,<0.12",
        "flax>=0.12.0,<0.14",
        "optax>=0.2.6,<0.3",
        "orbax-checkpoint>=0.12.0,<0.13",
        "gin-config>=0.5.0,<0.6",
        "sentencepiece>=0.2.0,<0.3",
        "seqio>=0.0.20,<0.1",
        "numpy>=1.26,<3",
        "tqdm>=4.66,<5",
        "sacrebleu>=2.4,<3",
        # tensorflow-datasets needs it to prepare a dataset but does not declare it.
        "importlib-resources>=6,<8",
        # scripts/clean_data.py: datatrove pipelines (local, Slurm, Ray); its JSONL writer needs orjson.
        "datatrove>=0.10.1,<0.11",
        "orjson>=3.9,<4",
        # t5lite.compilation_cache: JAX locks its cache directory with it when evicting.
        "filelock>=3.12,<5",
        # t5lite.host_malloc: an allocator that keeps XLA:CPU's freed step buffer (Linux x86-64
        # wheels only; elsewhere glibc's huge pages or a system jemalloc).
        "cmeel-mimalloc>=3.4,<4; sys_platform == 'linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4"],
        # torch==2.13.0 is the CPU build on this project's machines (a range would pull CUDA).
        "hf": ["torch==2.13.0", "transformers>=5.0,<6", "safetensors>=0.4,<1"],
    },
    entry_points={"console_scripts": ["t5lite-train=t5lite.train:cli"]},
)
