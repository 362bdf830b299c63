"""The microVM runtime: QEMU microvm sandboxes with their own Linux kernel (README: Runtimes)."""
