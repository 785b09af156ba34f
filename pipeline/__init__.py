"""pipeline: a config-driven batch pipeline that shows what convolutional networks compute."""
__version__ = "0.1.0"
