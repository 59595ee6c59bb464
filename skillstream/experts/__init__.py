"""Skills as LoRA experts on one frozen backbone: the pool, weighted mixing, routers, task signals
and novelty detection. Each module has one job; see its docstring."""
from .mixing import backbone_only, hybrid_weights, mixing, one_hot, sparse_topk
from .novelty import NoveltyDetector
from .pool import ExpertPool, ExpertRecord, MaturityRule
from .router import FeatureMemory, Router, RouterTrainer, normalized_entropy, pooled_features
from .signals import (ExpertProfile, SignalConfig, SimilarityWeights, TaskSignal, compute_signal, similarity,
                      similarity_components)

__all__ = ["ExpertPool", "ExpertRecord", "MaturityRule", "mixing", "backbone_only", "sparse_topk", "hybrid_weights",
           "one_hot", "Router", "RouterTrainer", "FeatureMemory", "pooled_features", "normalized_entropy",
           "TaskSignal", "ExpertProfile", "SignalConfig", "SimilarityWeights", "compute_signal", "similarity",
           "similarity_components", "NoveltyDetector"]
