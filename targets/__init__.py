"""rwkvc.targets."""
