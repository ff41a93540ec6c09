"""dynprompt: train and serve dynamic-prompt classifiers over frozen transformers."""

__version__ = "0.1.0"
