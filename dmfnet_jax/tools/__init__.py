"""Command-line tools beside the main entry point."""
