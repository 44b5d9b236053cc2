"""rwkvc.runtimes."""
