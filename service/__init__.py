"""introprior: Soft-Intro VAEs with learned multimodal priors, trained on Ray."""

__version__ = "0.1.0"
