"""Side-by-side benchmarks: nbdserver against qemu-nbd, nbdkit and nbd-server (python -m bench)."""
