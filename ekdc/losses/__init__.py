"""The distillation objective, term by term: a registry of loss terms (each says what it matches, where
it applies, what it needs, and its own settings), the divergences behind the KD term, and the weighted
sum a student stage minimises. Importing this package registers ekdc's own terms (``terms.py``)."""
from . import terms  # noqa: F401  (registration side effects)
from .kd import confidence_weights, dkd_parts, kd_kl, kl_per_sample
from .objective import Objective
from .registry import (
           MODES,
           NEEDS,
           LossTerm,
           TermInputs,
           get_term,
           list_terms,
           register_term,
           term_settings,
           terms_of_mode,
           unregister_term,
)
from .terms import KDSettings

__all__ = ["KDSettings", "LossTerm", "MODES", "NEEDS", "Objective", "TermInputs", "confidence_weights", "dkd_parts",
           "get_term", "kd_kl", "kl_per_sample", "list_terms", "register_term", "term_settings", "terms_of_mode",
           "unregister_term"]
