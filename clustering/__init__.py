"""Root-cause clusters of the error images (HUDD steps 1 and 2), one module per concern:
distances (heatmap distances and their files), ward (the dendrogram and its cuts), hac (one
layer's clusters, WICD and k), layers (the best layer), figures and folders (what the engineer
inspects). clusterModule.py is the step's entry point and re-exports them.
"""

CLUSTER_ANALYSIS = "ClusterAnalysis"    # T/<this>/<Layer>/: the clusters' folder, also read by explain/
