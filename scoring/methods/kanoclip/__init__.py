"""KAnoCLIP (``kanoclip``): knowledge-driven learnable prompts, CLIP-VV local features, Bi-CMCI
maps, Conv-Adapter score. Glue in ``method.py``, layers in ``model.py``, knowledge packs and
mask descriptions in ``knowledge.py`` (the bundled pack: ``knowledge.yaml``); paper, choices,
deviations and measurements in ``README.md``."""

from .knowledge import KnowledgePack, describe_anomaly
from .method import PLACEHOLDER, STATE_WORDS, KAnoCLIP, load_knowledge
from .model import BiCrossAttention, ConvAdapter

__all__ = ["PLACEHOLDER", "STATE_WORDS", "BiCrossAttention", "ConvAdapter", "KAnoCLIP", "KnowledgePack",
           "describe_anomaly", "load_knowledge"]
