"""File formats and safe file operations; imports nothing of selfflow."""
