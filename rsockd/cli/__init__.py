"""Command-line front ends that render what the service reports: ``rsockctl`` and ``rsockd --check``."""
