"""What the pipeline (Helper.py) runs on: the options, the case folder, error handling of a run, and the
clusters in words. Nothing here knows the order of the steps or the step cache."""
