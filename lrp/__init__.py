"""The LRP engine behind heatmapModule: rules and presets (rules), autograd functions that turn a backward
pass into relevance (functions), tracing a model into a plan of layers (tracing), modified layer weights
(weights), and the session that computes relevance for all layers in one backward (engine)."""
