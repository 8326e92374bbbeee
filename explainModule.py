"""The explanation step: root-cause clusters in words (a rule over the simulator parameters per cluster,
a description without them) and the paper's RQ1 measure.

The work lives in explain/rules.py and explain/rq1.py; this module is the step's one entry point.
"""
from clustering import CLUSTER_ANALYSIS
from explain.rq1 import (IMAGES_INSPECTED_PER_CLUSTER, RQ1_EXPLAINED_RATIO, format_rq1, read_params, rq1,
                         rq1_clusters, rq1_summary, write_rq1)
from explain.rules import (DESCRIPTION_COLUMNS, MAX_CATEGORIES, MAX_CONDITIONS, MAX_CONFUSION_PAIRS, MAX_DIGITS,
                           MIN_DIGITS, MIN_LIFT, MIN_RECALL, MIN_SUPPORT, MIN_SUPPORT_SHARE, MIN_WIDTH_SHARE,
                           NEAREST_TRAINING, REQUIRED_RULE_COLUMNS, RULE_COLUMNS, TEXT_COLUMNS, cluster_rules,
                           describe_clusters, descriptions_path, format_rules, nearest_training, read_descriptions,
                           read_rules, rule_line, rule_matches, rule_text, rules_path, write_rules)

__all__ = [
    "CLUSTER_ANALYSIS",
    "IMAGES_INSPECTED_PER_CLUSTER", "RQ1_EXPLAINED_RATIO", "format_rq1", "read_params", "rq1", "rq1_clusters",
    "rq1_summary", "write_rq1",
    "DESCRIPTION_COLUMNS", "MAX_CATEGORIES", "MAX_CONDITIONS", "MAX_CONFUSION_PAIRS", "MAX_DIGITS", "MIN_DIGITS",
    "MIN_LIFT", "MIN_RECALL", "MIN_SUPPORT", "MIN_SUPPORT_SHARE", "MIN_WIDTH_SHARE", "NEAREST_TRAINING",
    "REQUIRED_RULE_COLUMNS", "RULE_COLUMNS", "TEXT_COLUMNS", "cluster_rules", "describe_clusters",
    "descriptions_path", "format_rules", "nearest_training", "read_descriptions", "read_rules", "rule_line",
    "rule_matches", "rule_text", "rules_path", "write_rules",
]
