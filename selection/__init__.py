"""Selection of the improvement images an engineer labels (HUDD step 4), beside HUDD's closest-first assignment.

uncertainty: the DNN's own uncertainty per image (Gini impurity, margin, entropy of the softmax; the
MC-dropout spread of a keypoint DNN) and the ranking by it. hudd_u: HUDD's per-cluster quotas filled
most-uncertain-first. coverage: what a selection reaches (errors, root-cause clusters, conditions).
"""
