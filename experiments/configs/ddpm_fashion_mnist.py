r"""DDPM on Fashion-MNIST: the ddpm_mnist.py model and schedule on TFDS `fashion_mnist`.

ARG `cond`: class-conditional with classifier-free guidance (labels dropped with p = 0.1).
  Command:  python -m train --config=experiments/configs/ddpm_fashion_mnist.py:cond \
              --workdir=/tmp/ddpm_fashion_cond \
              [--config.data.raw_dir=DIR_WITH_IDX_FILES --config.data.data_dir=YOUR_TFDS_DIR]
            python -m train.sample --workdir=/tmp/ddpm_fashion_cond --guidance=3 --labels=all
  Hardware: 2-core CPU.
  Runtime:  as ddpm_mnist.py:cond (same model and steps); not trained here, only smoke-run.
  Result:   not measured.

Default (no ARG): unconditional. ARG `tiny` / `cond,tiny`: the smoke run of ddpm_mnist.py.
ARG `long` (e.g. `cond,long`): 6000 steps instead of 3600, as in ddpm_mnist.py (not measured here).
ARG `snr` (e.g. `cond,snr`): Min-SNR-5 loss weights and no dropout, as in ddpm_mnist.py (not
measured here).

Data: TFDS `fashion_mnist` from --config.data.data_dir or $TFDS_DATA_DIR. When it is not prepared
there, it is prepared without TensorFlow on first use from --config.data.raw_dir (the four IDX
.gz files), into --config.data.data_dir (a directory you can write).
"""

from experiments.configs import ddpm_mnist


def get_config(arg: str | None = None):
  return ddpm_mnist.diffusion_config('fashion_mnist', set(arg.split(',')) if arg else set())
