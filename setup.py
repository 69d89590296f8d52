"""ascend_edit: convert trained Hugging Face LLMs to MLA / GateSWA attention by progressive distillation."""
from setuptools import find_packages, setup

# torch is pinned exactly: an unpinned torch lets pip resolve a multi-GB CUDA build on CPU machines.
CORE = [
    "torch==2.13.0",
    "transformers==5.24.0",
    "tokenizers>=0.22,<0.24",
    "safetensors>=0.6",
    "deepspeed==0.19.8",
    "hydra-core==1.3.8",
    "omegaconf==2.3.1",
    "accelerate>=1.10",
    "gguf>=0.17",
    "tqdm>=4.66",
    "rich>=13",
    "numpy>=1.26",
    "matplotlib>=3.8",
    "tensorboard>=2.16",  # event files while training (ascend_edit/eval/tensorboard.py)
]

EXTRAS = {
    # hydra-submitit-launcher (pure Python, small): the Slurm launcher config and the docs' sweep
    # commands that use it compose in tests.
    # mypy pinned (a new release can add errors to unchanged code); types-tqdm: tqdm ships no types.
    "test": ["pytest>=8", "pyarrow>=15", "datasets>=3", "hydra-submitit-launcher==1.2.0", "ruff>=0.6",
             "mypy==2.4.1", "types-tqdm==4.70.0.20261106"],
    # torch_npu needs the CANN toolkit; installing it on a machine without CANN breaks `import torch`.
    "npu": ["torch_npu==2.13.0"],
    # MindSpeed's fused ops (only its rotary op is used, behind the kernel registry); installed from source
    # at the branch released with torch_npu 2.13.0's line (TorchNPU 26.2.0, CANN 9.2.0). See docs/npu.md.
    "mindspeed": ["mindspeed @ git+https://gitcode.com/Ascend/MindSpeed.git@26.2.0_core_r0.12.1"],
    "gpu": ["triton>=3.2"],
    "data": ["pyarrow>=15", "datasets>=3"],
    # lm-evaluation-harness on exported models, offline, with bundled local tasks (ascend_edit/eval/lm_eval_adapter.py)
    "lm_eval": ["lm-eval==0.4.13"],
    # hydra/launcher=slurm: each job of a multirun as its own Slurm job (conf/hydra/launcher/slurm.yaml).
    "slurm": ["hydra-submitit-launcher==1.2.0"],
}

setup(
    name="ascend_edit",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=["ascend_edit", "ascend_edit.*"])
    + ["ascend_edit.kernels", "ascend_edit.kernels.npu", "ascend_edit.kernels.triton", "ascend_edit.conf"],
    # kernels/ and conf/ ship inside the package: a top-level `kernels` module would shadow Hugging
    # Face's `kernels` package (transformers probes for it), and Hydra finds configs by module.
    package_dir={"ascend_edit.kernels": "kernels", "ascend_edit.conf": "conf"},
    package_data={"ascend_edit.conf": ["*.yaml", "*/*.yaml", "*/*/*.yaml"],
                  "ascend_edit.eval": ["lm_eval_tasks/*.yaml", "lm_eval_tasks/*.jsonl", "lm_eval_tasks/*.py"]},
    include_package_data=True,
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["ascend-edit=ascend_edit.cli:main"]},
)
