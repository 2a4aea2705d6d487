"""The package version, importable without importing the package's API (for records of what made a file)."""

__version__ = "0.1.0"
