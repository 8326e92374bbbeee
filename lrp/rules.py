"""LRP rules and presets as small declarative objects (zennit style): a rule says how a layer's inputs,
weights and denominator are modified, a preset maps layer kinds to rules. No rule holds a backward loop;
lrp.engine applies them all with one mechanism."""
from dataclasses import dataclass

from common.errors import HUDDError

HUDD_EPSILON = 1e-9         # the original's Z = Y + 1e-9 for convolutions, pools and z+ layers
ZENNIT_EPSILON = 1e-6       # zennit's default stabiliser, used by the epsilon and composite presets


@dataclass(frozen=True)
class Term:
    """One summand of a layer's modified forward: z += layer(inputs, weights, bias).

    inputs: x | x+ | x- | x-low | x-high (x minus the zB bounds); weights/bias: all | positive |
    negative | zero. Relevance = sum over terms of input ⊙ gradient of the term.
    """

    inputs: str = "x"
    weights: str = "all"
    bias: str = "all"


PLAIN = (Term(),)


@dataclass(frozen=True)
class Rule:
    """How a layer maps the relevance R at its output to its input.

    kind: "lrp" = x ⊙ J_z^T (R / stabilised z) with z the sum of `terms`; "winner" = the same for a
    max-pool (winner takes all, summed where windows overlap); "pass" = R unchanged; "gradient" = the
    layer's own gradient; "unpool" = the original's max_unpool2d (overwrites where pooling windows share
    a maximum). `signed`: add epsilon with the sign of z (zennit), else add it.
    """

    name: str
    kind: str = "lrp"
    terms: tuple = PLAIN
    epsilon: float = HUDD_EPSILON
    signed: bool = False


@dataclass(frozen=True)
class Preset:
    """Layer kind -> rule; `first` overrides the rule of the first conv or linear layer in forward order
    (the input layer, also behind a Flatten or a pool, as zennit's first-layer composites)."""

    name: str
    conv: Rule
    linear: Rule
    maxpool: Rule
    avgpool: Rule
    first: Rule = None
    description: str = ""


PASS = Rule("pass", kind="pass")
GRADIENT = Rule("gradient", kind="gradient")
LRP_HUDD = Rule("z (Y + 1e-9)")
WINNER_HUDD = Rule("winner takes all (Y + 1e-9)", kind="winner")
ZPLUS_HUDD = Rule("z+ (bias ignored)", terms=(Term(weights="positive", bias="zero"),))
UNPOOL_COMPAT = Rule("max-unpool (overwrites)", kind="unpool")
EPSILON = Rule("epsilon", epsilon=ZENNIT_EPSILON, signed=True)
ZPLUS = Rule("z+", terms=(Term("x+", "positive", "positive"), Term("x-", "negative", "zero")),
             epsilon=ZENNIT_EPSILON, signed=True)
# zB: z = W x + b - (W+ l + b+) - (W- h + b-) = W+ (x - l) + W- (x - h), since W = W+ + W- and b = b+ + b-;
# two terms instead of three, and R = (x - l) ⊙ J+^T S + (x - h) ⊙ J-^T S is the same relevance.
ZBOX = Rule("zB", terms=(Term("x-low", "positive", "zero"), Term("x-high", "negative", "zero")),
            epsilon=ZENNIT_EPSILON, signed=True)

RULES = {
    "hudd": Preset("hudd", conv=LRP_HUDD, linear=ZPLUS_HUDD, maxpool=WINNER_HUDD, avgpool=LRP_HUDD,
                   description="the original's rules; winner-takes-all max-pool summed where windows overlap"),
    "hudd-compat": Preset("hudd-compat", conv=LRP_HUDD, linear=ZPLUS_HUDD, maxpool=UNPOOL_COMPAT,
                          avgpool=LRP_HUDD,
                          description="hudd plus the original's max_unpool2d overwriting at overlapping pools"),
    "epsilon": Preset("epsilon", conv=EPSILON, linear=EPSILON, maxpool=GRADIENT, avgpool=EPSILON,
                      description="LRP-epsilon (1e-6) everywhere, max-pool by its gradient (as zennit)"),
    "composite": Preset("composite", conv=ZPLUS, linear=EPSILON, maxpool=GRADIENT, avgpool=EPSILON,
                        first=ZBOX,
                        description="zB on the input layer, z+ on convolutions, epsilon on dense layers"),
}


def preset(rule):
    """The Preset named `rule` (or `rule` itself when it is one)."""
    if isinstance(rule, Preset):
        return rule
    if rule not in RULES:
        raise HUDDError(f"unknown LRP rule {rule!r}; use one of {', '.join(RULES)}")
    return RULES[rule]
