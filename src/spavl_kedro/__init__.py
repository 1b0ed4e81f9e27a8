"""spavl_kedro: SPA-VL and MIS safety alignment of vision-language models as Kedro pipelines."""

from spavl_kedro.numerics import pin_cpu_kernels

pin_cpu_kernels()  # before anything imports torch: the same figures on every x86-64 machine (numerics.py)
