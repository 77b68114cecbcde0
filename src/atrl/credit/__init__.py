"""Deciding: token graph, partition, anchor clusters, weights W(C_k), all credit modes.

Pure functions on tensors / arrays; see `assign_credit` for the batched entry point and
`PendingCredit` for its asynchronous form.
"""

from .assign import CREDIT_MODES, CreditOptions, CreditResult, PendingCredit, assign_credit
from .graph import PARTITION_METHODS, CSRGraph, num_parts, partition_tokens, token_graph
from .weights import bimodality_coefficient, cluster_densities, otsu_threshold, select_anchor_clusters

__all__ = ["CREDIT_MODES", "PARTITION_METHODS", "CSRGraph", "CreditOptions", "CreditResult", "PendingCredit",
           "assign_credit", "bimodality_coefficient", "cluster_densities", "num_parts", "otsu_threshold", "partition_tokens",
           "select_anchor_clusters", "token_graph"]
