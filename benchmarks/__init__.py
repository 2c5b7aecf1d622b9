"""Benchmarks: attention kernels, training throughput, generation, TPU planning."""
