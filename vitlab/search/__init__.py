"""Architecture search (ViT-ResNAS): the search space, the weight-sharing supernet, evolutionary / random / NSGA-II
search under a MAC or CPU-latency budget; the same machinery on a Hiera-style space (TurboViT proxy search).
`vitlab search` runs it end to end (docs/search.md)."""
from .evolution import LatencyCost, evolutionary_search, nsga2_search, pareto_front, random_search
from .hiera_space import HieraSpace, HieraStageChoices
from .hiera_supernet import HieraSupernet
from .space import SearchSpace, StageChoices, def_key
from .supernet import Supernet, masked_layer_norm, train_supernet

__all__ = ["SearchSpace", "StageChoices", "def_key", "Supernet", "masked_layer_norm", "train_supernet",
           "evolutionary_search", "random_search", "nsga2_search", "pareto_front", "LatencyCost",
           "HieraSpace", "HieraStageChoices", "HieraSupernet"]
