"""The parts behind robustnessModule: the perturbations and perturbed data sets (perturbations), the
perturbed images written into the case folder (images), their plots (plots) and their params.csv rows
(params)."""
