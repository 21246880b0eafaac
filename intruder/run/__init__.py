"""The runtime: scheduling, devices, threads, streaming and the base cache.

spectral/ holds the per-matrix mathematics; this package runs it over whole checkpoints:
driver.py (scan_pairs), stream.py (readers -> device workers -> results in order), devices.py,
multi.py (several GPUs, torchrun), threads.py (BLAS / OpenMP threads), cache.py (base spectra on
disk) and load.py (one pair read and checked).
"""
