# Dataset registration and mappers; imported by flowseg/__init__.py so datasets register on import.
from . import (  # noqa: F401
    dataset_mappers,
    datasets,
    synthetic,  # noqa: F401
    writers,
)
from .build import MAPPER_REGISTRY, build_test_mapper, build_train_mapper  # noqa: F401
from .mixed import build_mixed_loader_from_datasets, build_mixed_train_loader  # noqa: F401
