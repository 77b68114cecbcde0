"""Deciding: token graph, partition, anchor clusters, weights W(C_k), all credit modes.

Pure functions on tensors / arrays; see `assign_credit` for the batched entry point and
`PendingCredit` for its asynchronous form.
"""

from .assign import CreditOptions, CreditResult, PendingCredit, assign_credit
from .graph import PARTITION_METHODS, CSRGraph, num_parts, partition_tokens, token_graph
from .modes import Choice, CreditMode, ResponseScores, credit_mode, credit_mode_names, register_credit_mode
from .weights import (anchor_credit_sums, bimodality_coefficient, cluster_densities, otsu_threshold,
                      select_anchor_clusters)

__all__ = ["PARTITION_METHODS", "CSRGraph", "Choice", "CreditMode", "CreditOptions", "CreditResult", "PendingCredit",
           "ResponseScores", "anchor_credit_sums", "assign_credit", "bimodality_coefficient", "cluster_densities",
           "credit_mode", "credit_mode_names", "num_parts", "otsu_threshold", "partition_tokens", "register_credit_mode",
           "select_anchor_clusters", "token_graph"]
