"""Root-cause clusters in words: rules over the simulator parameters and descriptions without them
(rules), the paper's RQ1 variance measure (rq1), and image properties measured from the pixels for cases
without a simulator (properties). Reads the clusters that clustering/ wrote and never imports
clusterModule, which imports RQ1 from here.
"""
