"""Data of long-tailed classification: the embedded set, registration, mapper, samplers, loaders."""
from .build import build_classification_test_loader, build_classification_train_loader
from .datasets import load_classification_json, prepare_classification_dataset, register_synthetic_classification
from . import inaturalist as _inaturalist  # noqa: F401  # registration: iNaturalist 2018
from .mapper import ClassificationDatasetMapper
from .samplers import SAMPLERS, ClassAwareTrainingSampler
from .synthetic import QUICKSTART_CLS_SPEC, TINY_CLS_SPEC, SyntheticClassificationSpec

__all__ = ["build_classification_test_loader", "build_classification_train_loader", "load_classification_json",
           "prepare_classification_dataset", "register_synthetic_classification", "ClassificationDatasetMapper",
           "SAMPLERS", "ClassAwareTrainingSampler", "QUICKSTART_CLS_SPEC", "TINY_CLS_SPEC",
           "SyntheticClassificationSpec"]
