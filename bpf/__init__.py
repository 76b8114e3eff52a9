"""The eBPF C sources, shipped as package data (compiled at run time by bcc)."""
