from .controller import Controller
from .mdn import MDNRNN, MDNOut, mdn_loss, mdn_nll, sample_next
from .vae import ConvVAE, kl_beta, to_float, vae_loss

__all__ = [
    "ConvVAE", "vae_loss", "kl_beta", "to_float",
    "MDNRNN", "MDNOut", "mdn_nll", "mdn_loss", "sample_next",
    "Controller",
]
