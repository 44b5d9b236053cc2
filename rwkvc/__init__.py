"""rwkvc: an ONNX-centric deployment compiler for RWKV language models."""
__version__ = "0.1.0"


def load(path, threads=None, **runtime_options):
    """Load a compiled artifact directory: `m = rwkvc.load(DIR); logits, state = m.forward(tokens)`."""
    from .api import load as _load
    return _load(path, threads=threads, **runtime_options)


def compile(model_path, out_dir, target="cpu", **kw):  # noqa: A001  (the verb users expect)
    """Compile a checkpoint into an artifact directory; returns its path."""
    from .pipeline import compile_checkpoint
    return compile_checkpoint(model_path, out_dir, target=target, **kw)
