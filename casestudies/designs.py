"""The builder's choices that its parts share: the DNN architectures (--arch) and how rare the named
conditions are in TrainingSet (--design; eyes.py draws them)."""
ARCHS = {"smallalexnet": {}, "smallalexnet-bn": {"batchnorm": True}}   # --arch -> SmallAlexNet keywords
DEFAULT_ARCH = "smallalexnet"
DESIGNS = ("rarer", "incomplete", "oracle")
DEFAULT_DESIGN = "rarer"
