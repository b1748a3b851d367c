"""The package version, on the floor so release metadata can name it without importing hhdata."""

__version__ = "0.1.0"
