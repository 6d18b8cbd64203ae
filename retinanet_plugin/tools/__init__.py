"""Command-line tools, run as ``python -m retinanet_plugin.tools.<name>``."""
