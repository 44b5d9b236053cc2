"""rwkvc.training."""
