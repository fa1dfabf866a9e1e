"""Test doubles: the emulated GPU (fake_nvml.c, built by build.py, driven by fake_gpu.py)."""
