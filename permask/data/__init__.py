"""Data for permask's experiments and commands: datasets read into uint8 tensors
(:mod:`~permask.data.datasets`), the in-memory loader (:mod:`~permask.data.loader`), the
streaming image-folder loader (:mod:`~permask.data.stream`), text in token windows
(:mod:`~permask.data.text`), and the :class:`Loader` protocol
both satisfy (:mod:`~permask.data.protocol`). It uses no other part of permask but its helpers."""

from .datasets import DataNotFoundError, load_dataset
from .loader import TensorLoader, get_loaders
from .protocol import Loader

__all__ = ["DataNotFoundError", "Loader", "TensorLoader", "get_loaders", "load_dataset"]
