"""rwkvc.passes."""
