"""imgpipe: image-dataset preparation and training, as a Kubeflow pipeline of plain steps."""

__version__ = "0.1.0"
