"""kubetune: fine-tune, align, evaluate and serve LLMs on Kubernetes."""

__version__ = "0.1.0"
