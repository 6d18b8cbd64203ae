"""Command-line tools, each run as ``python -m retinanet_plugin.tools.<name>``."""
